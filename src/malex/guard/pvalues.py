"""p-values: how unusual a detector's score is among clean calibration scores.

Plain conformal p-values cannot go below 1 / (n + 1): every score beyond the largest clean one gets
the same p-value, however far beyond it lies, so a detector that separates perfectly and one that
barely does look alike to the guard. Above the calibration scores' top `tail_fraction`, the p-value
therefore follows an exponential tail fitted to those top scores (peaks over a threshold, the
exponential being the generalised Pareto with shape 0): it keeps falling the further a score lies
beyond the clean ones, and below the tail it is the conformal p-value.
"""

from __future__ import annotations

import numpy as np

#: share of the calibration scores (at least MIN_TAIL of them) to which the exponential tail is fitted
TAIL_FRACTION = 0.1
MIN_TAIL = 5


def conformal_pvalues(calibration: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """p(s) = (1 + #{clean calibration scores >= s}) / (n + 1): small means unusually suspicious."""
    cal = np.sort(np.asarray(calibration, dtype=np.float64))
    s = np.asarray(scores, dtype=np.float64)
    at_least = cal.size - np.searchsorted(cal, s, side="left")
    return (1.0 + at_least) / (cal.size + 1.0)


def _tail_size(n: int) -> int:
    return min(n - 1, max(MIN_TAIL, int(np.ceil(TAIL_FRACTION * n))))


def tail_parameters(calibration: np.ndarray) -> tuple[int, float, float] | None:
    """(k, u, scale) of the exponential tail `tail_pvalues` fits to the calibration scores: the tail size, the
    (k+1)-th largest score and the mean excess of the top k over it (their standard deviation when they all tie);
    None when there are too few scores for a tail."""
    cal = np.asarray(calibration, dtype=np.float64)
    if cal.size < MIN_TAIL + 1:
        return None
    k = _tail_size(cal.size)
    top = np.sort(cal)[::-1]
    u = float(top[k])
    scale = float(np.mean(top[:k] - u))
    if not scale > 0:
        scale = float(np.std(cal)) or 1e-12
    return k, u, scale


def tail_pvalues(calibration: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Conformal p-values, continued beyond the top calibration scores by a fitted exponential tail.

    With the calibration scores sorted from the largest, u the (k+1)-th largest and the scale the
    mean excess of the top k over u, a score s > u gets min(conformal p, (k + 1)/(n + 1) exp(-(s - u)/scale)).
    When the top scores all tie (a discrete score), the scale falls back to their standard deviation.
    """
    cal = np.asarray(calibration, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    p = conformal_pvalues(cal, s)
    tail = tail_parameters(cal)
    if tail is None:
        return p
    k, u, scale = tail
    beyond = s > u
    p[beyond] = np.minimum(p[beyond], (k + 1.0) / (cal.size + 1.0) * np.exp(-(s[beyond] - u) / scale))
    return p


def in_sample_pvalues(calibration: np.ndarray) -> np.ndarray:
    """Each calibration score's conformal p-value against the OTHER calibration scores.

    Scoring calibration inputs against a set that contains them would make their p-values larger than
    a new clean input's and the guard's false-positive rate too high; against the other n - 1 scores,
    (1 + #{others >= s_i}) / n = #{all >= s_i} / n, they match what a new clean input gets.
    """
    cal = np.asarray(calibration, dtype=np.float64)
    ordered = np.sort(cal)
    return (cal.size - np.searchsorted(ordered, cal, side="left")) / cal.size


def in_sample_tail_pvalues(calibration: np.ndarray) -> np.ndarray:
    """`tail_pvalues` of each calibration score against the other calibration scores (leave one out).

    Only the scores in or at the edge of the tail can fall beyond the others' tail threshold, so only
    those are recomputed; the rest keep their in-sample conformal p-value.
    """
    cal = np.asarray(calibration, dtype=np.float64)
    p = in_sample_pvalues(cal)
    if cal.size < MIN_TAIL + 2:
        return p
    for i in np.argsort(cal)[::-1][: _tail_size(cal.size - 1) + 1]:
        p[i] = tail_pvalues(np.delete(cal, i), cal[i : i + 1])[0]
    return p
