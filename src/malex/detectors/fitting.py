"""The one fit -> score path shared by the guard, the evaluation and the study: every detector reads one
probe pass that captures the union of the layers they need.

Scores are probed `chunk` inputs at a time and only the scores are kept. No detector's score of an input
depends on the other inputs scored with it (tests/test_detector_contract.py), so chunking changes no score,
bit for bit when the chunk is a multiple of the batch sizes the probe and the detectors use, else at most by
the float rounding of other batch sizes.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import nn

from malex.detectors.base import Detector
from malex.errors import ConfigError
from malex.probe import Observation, Probe
from malex.progress import track


def joint_probe(model: nn.Module, detectors: Mapping[str, Detector]) -> Probe:
    """One Probe capturing the union of every detector's layers (detectors in order, each's `layers()`)."""
    return Probe(model, [layer for det in detectors.values() for layer in det.layers()])


def fit_detectors(detectors: Mapping[str, Detector], probe: Probe, x: torch.Tensor, y: torch.Tensor | None = None,
                  *, batch_size: int = 256, progress: bool = False, label: str = "fitting detectors") -> None:
    """ONE probe pass over the clean inputs `x`, then every detector's fit on it (labels `y` optional)."""
    fit_observed(detectors, probe.run(x, batch_size, progress=progress), y, progress=progress, label=label)


def fit_observed(detectors: Mapping[str, Detector], observed: Observation, y: torch.Tensor | None = None, *,
                 progress: bool = False, label: str = "fitting detectors") -> None:
    """Every detector's fit on a probe pass already made over clean inputs."""
    for det in track(list(detectors.values()), label, enabled=progress):
        det.fit(observed, y)


def score_observed(detectors: Mapping[str, Detector], observed: Observation) -> dict[str, np.ndarray]:
    """Every detector's float64 scores of the inputs of a probe pass already made."""
    return {name: np.asarray(det.score(observed), dtype=np.float64) for name, det in detectors.items()}


def score_detectors(detectors: Mapping[str, Detector], probe: Probe, x: torch.Tensor, *, batch_size: int = 256,
                    chunk: int = 4096, progress: bool = False, label: str = "scoring",
                    index: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """Every detector's float64 scores of `x`, probing `chunk` inputs at a time so that only scores are kept;
    `x` of length 0 gives empty arrays. With `index`, the inputs x[index] are scored, indexed chunk by chunk
    (no copy of all of them is made)."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ConfigError(f"chunk is {chunk!r}; expected an int >= 1")
    n = len(x) if index is None else len(index)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in detectors}
    starts = range(0, n, chunk)
    for start in track(starts, label, enabled=progress and len(starts) > 1):
        rows = slice(start, start + chunk)
        for name, s in score_observed(detectors, probe.run(x[rows] if index is None else x[index[rows]],
                                                           batch_size)).items():
            parts[name].append(s)
    return {name: np.concatenate(p) if p else np.zeros(0) for name, p in parts.items()}
