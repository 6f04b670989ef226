"""Maximum softmax probability (Hendrycks and Gimpel, "A Baseline for Detecting Misclassified and
Out-of-Distribution Examples in Neural Networks", ICLR 2017): the floor every method must beat.

The score is 1 - max_c softmax(z)_c of the logits z the probe pass already holds, so higher means less
confident and more suspicious. It needs no layer beyond the logits and learns nothing from the clean
inputs; `fit` only records their mean confidence (reported in `state`) so that the detector follows the
fit-then-score contract like every other. `temperature` divides the logits before the softmax (1 = the
plain baseline).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from malex.detectors.base import Detector
from malex.errors import ConfigError, InputError
from malex.probe import Observation


@dataclass(frozen=True)
class MSPConfig:
    """`temperature`: the logits are divided by it before the softmax (> 0; 1 = the plain baseline)."""

    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise ConfigError(f"MSP temperature is {self.temperature!r}; expected a finite number > 0")


def max_softmax(logits: torch.Tensor, temperature: float = 1.0) -> np.ndarray:
    """The largest softmax probability of each row of `logits` (float64)."""
    return torch.softmax(logits.double() / temperature, dim=1).amax(dim=1).numpy()


class MSP(Detector):
    """One minus the maximum softmax probability; no layer but the logits, nothing learnt."""

    name = "msp"
    config_class = MSPConfig
    evidence = None
    config: MSPConfig
    fitted_attributes = ("clean_confidence_",)

    def fit(self, clean: Observation, y: torch.Tensor | None = None) -> "MSP":
        """Record the mean maximum softmax probability of the clean inputs (nothing else is learnt)."""
        if len(clean) == 0:
            raise InputError("MSP needs at least one clean input to fit; got none")
        self.clean_confidence_ = float(max_softmax(clean.logits, self.config.temperature).mean())
        return self

    def score(self, obs: Observation) -> np.ndarray:
        """1 - max softmax probability per input: higher means less confident."""
        self.check_fitted()
        return 1.0 - max_softmax(obs.logits, self.config.temperature)

    def state(self) -> dict:
        return {"config": asdict(self.config), "clean_confidence_": getattr(self, "clean_confidence_", None)}
