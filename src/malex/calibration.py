"""Thresholds calibrated on held-out clean scores at a target false-positive rate.

`DEFAULT_FPR` is the one default target everywhere (guard, study, CLI, demo) and `check_fpr` the one
check of a target: a share of clean inputs that may be flagged, in [0, 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from malex.errors import ConfigError, InputError

#: the target false-positive rate used wherever none is given
DEFAULT_FPR = 0.05


def check_fpr(fpr: object, where: str = "target false-positive rate") -> float:
    """`fpr` as a float, or `ConfigError` naming `where` unless it is a number in [0, 1)."""
    if isinstance(fpr, bool) or not isinstance(fpr, (int, float)) or not math.isfinite(fpr) or not 0.0 <= fpr < 1.0:
        raise ConfigError(f"{where}: {fpr!r}; expected a number in [0, 1)")
    return float(fpr)


@dataclass(frozen=True)
class Threshold:
    """Inputs whose score is strictly above `value` are flagged; `fpr` is the target it was set for."""

    value: float
    fpr: float

    def flags(self, scores: np.ndarray) -> np.ndarray:
        """Boolean flag per score; a NaN score is flagged (a detector that cannot score an input does not pass it)."""
        s = np.asarray(scores, dtype=np.float64)
        return (s > self.value) | np.isnan(s)


def calibrate(clean_scores: np.ndarray, fpr: float = DEFAULT_FPR) -> Threshold:
    """The smallest threshold whose false-positive rate on `clean_scores` is at most `fpr`."""
    fpr = check_fpr(fpr)
    scores = np.sort(np.asarray(clean_scores, dtype=np.float64))
    if scores.size == 0:
        raise InputError("no clean scores to calibrate a threshold on")
    if not np.isfinite(scores).all():
        raise InputError("clean scores contain NaN or infinite values; cannot calibrate a threshold")
    allowed = int(np.floor(fpr * scores.size))  # how many clean inputs may lie above the threshold
    value = scores[scores.size - 1 - allowed]
    return Threshold(float(value), float(fpr))
