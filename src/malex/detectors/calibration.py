"""Thresholds calibrated on held-out clean scores at a target false-positive rate."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from malex.errors import ConfigError, InputError


@dataclass(frozen=True)
class Threshold:
    """Inputs whose score is strictly above `value` are flagged; `fpr` is the target it was set for."""

    value: float
    fpr: float

    def flags(self, scores: np.ndarray) -> np.ndarray:
        """Boolean flag per score; a NaN score is flagged (a detector that cannot score an input does not pass it)."""
        s = np.asarray(scores, dtype=np.float64)
        return (s > self.value) | np.isnan(s)


def calibrate(clean_scores: np.ndarray, fpr: float = 0.05) -> Threshold:
    """The smallest threshold whose false-positive rate on `clean_scores` is at most `fpr`."""
    if not 0.0 <= fpr < 1.0:
        raise ConfigError(f"target false-positive rate is {fpr}; expected a value in [0, 1)")
    scores = np.sort(np.asarray(clean_scores, dtype=np.float64))
    if scores.size == 0:
        raise InputError("no clean scores to calibrate a threshold on")
    if not np.isfinite(scores).all():
        raise InputError("clean scores contain NaN or infinite values; cannot calibrate a threshold")
    allowed = int(np.floor(fpr * scores.size))  # how many clean inputs may lie above the threshold
    value = scores[scores.size - 1 - allowed]
    return Threshold(float(value), float(fpr))
