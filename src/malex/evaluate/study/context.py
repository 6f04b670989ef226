"""What every step of a study run shares: the config, the output folder, the device, progress and log, and
counts of the work done."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from malex.evaluate.study.cache import StudyLayout
from malex.evaluate.study.config import StudyConfig

Log = Callable[[str], None]
#: what a run counts (StudyRun.counts): each is one artifact made, not read from the cache
COUNTS = ("models_trained", "attacks_crafted", "detectors_fitted", "guards_fitted", "detector_scores",
          "guard_screenings", "analyses", "adaptive_runs")


def quiet(_message: str) -> None:
    """A log that drops every line."""


@dataclass
class StudyContext:
    """The run-wide settings and tallies handed to each step."""

    config: StudyConfig
    layout: StudyLayout
    device: torch.device
    progress: bool = True
    log: Log = quiet
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))
