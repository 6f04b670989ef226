"""Conformal p-values: how unusual a score is among clean calibration scores."""

from __future__ import annotations

import numpy as np


def conformal_pvalues(calibration: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """p(s) = (1 + #{clean calibration scores >= s}) / (n + 1): small means unusually suspicious."""
    cal = np.sort(np.asarray(calibration, dtype=np.float64))
    s = np.asarray(scores, dtype=np.float64)
    at_least = cal.size - np.searchsorted(cal, s, side="left")
    return (1.0 + at_least) / (cal.size + 1.0)
