"""Conformal p-values: how unusual a score is among clean calibration scores."""

from __future__ import annotations

import numpy as np


def conformal_pvalues(calibration: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """p(s) = (1 + #{clean calibration scores >= s}) / (n + 1): small means unusually suspicious."""
    cal = np.sort(np.asarray(calibration, dtype=np.float64))
    s = np.asarray(scores, dtype=np.float64)
    at_least = cal.size - np.searchsorted(cal, s, side="left")
    return (1.0 + at_least) / (cal.size + 1.0)


def in_sample_pvalues(calibration: np.ndarray) -> np.ndarray:
    """Each calibration score's p-value against the OTHER calibration scores.

    Scoring calibration inputs against a set that contains them would make their p-values larger than
    a new clean input's and the guard's false-positive rate too high; against the other n - 1 scores,
    (1 + #{others >= s_i}) / n = #{all >= s_i} / n, they match what a new clean input gets.
    """
    cal = np.asarray(calibration, dtype=np.float64)
    ordered = np.sort(cal)
    return (cal.size - np.searchsorted(ordered, cal, side="left")) / cal.size
