"""The detector contract.

A detector is fitted on clean inputs only; `score` returns one float per input, higher meaning more
suspicious. Fitted state lives in attributes whose names end in "_". Detectors read the `Observation`
of the shared probe pass; `layers()` names what they need captured. Thresholding (calibration.py) and
evaluation (malex.evaluate) are separate pieces.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from malex.errors import NotFittedError
from malex.probe import Observation, Probe


class Detector(ABC):
    """Base class of every detector."""

    name: ClassVar[str]
    #: attributes that `fit` sets; `check_fitted` raises until they exist
    fitted_attributes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def layers(self) -> list[str]:
        """Probe layers this detector reads (names as in `Probe`)."""
        return []

    @abstractmethod
    def fit(self, clean: Observation, y: torch.Tensor | None = None) -> "Detector":
        """Learn from the probe pass over clean inputs (labels optional); returns self."""

    @abstractmethod
    def score(self, obs: Observation) -> np.ndarray:
        """One float64 per input; higher means more suspicious."""

    @property
    def is_fitted(self) -> bool:
        return all(hasattr(self, a) for a in self.fitted_attributes)

    def check_fitted(self) -> None:
        """Raise `NotFittedError` if `fit` has not run."""
        if not self.is_fitted:
            raise NotFittedError(f"detector {self.name!r} is not fitted; call fit() on clean inputs first")

    def state(self) -> dict:
        """Settings and fitted summary values, JSON-able (for reports)."""
        return {}

    def observe(self, x: torch.Tensor, batch_size: int = 256) -> Observation:
        """A probe pass capturing just what this detector needs (for standalone use)."""
        return Probe(self.model, self.layers()).run(x, batch_size=batch_size)
