"""Detection metrics: AUROC, TPR at a fixed FPR, and the study's detection accuracy."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from malex.calibration import Threshold, calibrate
from malex.errors import InputError


def _check(clean: np.ndarray, malicious: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    clean = np.asarray(clean, dtype=np.float64).ravel()
    malicious = np.asarray(malicious, dtype=np.float64).ravel()
    if clean.size == 0 or malicious.size == 0:
        raise InputError(f"need clean and malicious scores; got {clean.size} clean and {malicious.size} malicious")
    if not (np.isfinite(clean).all() and np.isfinite(malicious).all()):
        raise InputError("scores contain NaN or infinite values")
    return clean, malicious


def auroc(clean: np.ndarray, malicious: np.ndarray) -> float:
    """Area under the ROC curve, malicious as the positive class."""
    clean, malicious = _check(clean, malicious)
    labels = np.r_[np.zeros(clean.size), np.ones(malicious.size)]
    return float(roc_auc_score(labels, np.r_[clean, malicious]))


def roc(clean: np.ndarray, malicious: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rates, true-positive rates) of the ROC curve."""
    clean, malicious = _check(clean, malicious)
    fpr, tpr, _ = roc_curve(np.r_[np.zeros(clean.size), np.ones(malicious.size)], np.r_[clean, malicious])
    return fpr, tpr


def tpr_at_fpr(clean: np.ndarray, malicious: np.ndarray, fpr: float) -> float:
    """Share of malicious inputs flagged at the threshold that flags at most `fpr` of these clean inputs."""
    clean, malicious = _check(clean, malicious)
    return float(calibrate(clean, fpr).flags(malicious).mean())


@dataclass(frozen=True)
class DetectionMetrics:
    """The numbers reported per detector and attack."""

    auroc: float
    tpr_at_1fpr: float
    tpr_at_5fpr: float
    clean_pass: float  # share of clean inputs passed at the calibrated threshold
    malicious_caught: float  # share of malicious inputs flagged at the calibrated threshold
    n_clean: int
    n_malicious: int

    @property
    def detection_accuracy(self) -> float:
        """The study's detection accuracy over the clean and malicious inputs together."""
        total = self.n_clean + self.n_malicious
        return (self.clean_pass * self.n_clean + self.malicious_caught * self.n_malicious) / total

    def as_dict(self) -> dict:
        return {**asdict(self), "detection_accuracy": self.detection_accuracy}


def evaluate_flags(clean: np.ndarray, clean_flagged: np.ndarray, malicious: np.ndarray,
                   malicious_flagged: np.ndarray) -> DetectionMetrics:
    """All metrics from scores (threshold-free ones) and given flags (the clean inputs passed, the malicious
    inputs caught), e.g. a guard's own verdicts."""
    clean, malicious = _check(clean, malicious)
    return DetectionMetrics(
        auroc=auroc(clean, malicious),
        tpr_at_1fpr=tpr_at_fpr(clean, malicious, 0.01),
        tpr_at_5fpr=tpr_at_fpr(clean, malicious, 0.05),
        clean_pass=float(1.0 - np.mean(clean_flagged)),
        malicious_caught=float(np.mean(malicious_flagged)),
        n_clean=int(clean.size),
        n_malicious=int(malicious.size),
    )


def evaluate_scores(clean: np.ndarray, malicious: np.ndarray, threshold: Threshold) -> DetectionMetrics:
    """All metrics for one detector on one attack, `threshold` calibrated on a separate clean split."""
    clean, malicious = _check(clean, malicious)
    return evaluate_flags(clean, threshold.flags(clean), malicious, threshold.flags(malicious))


def unscored_as_suspicious(clean: np.ndarray, malicious: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Clean and malicious scores with NaN (an input a detector could not score) and +inf set above every
    finite score, as a threshold treats them (flagged), and -inf below; also returns how many there were."""
    both = np.concatenate([clean, malicious]).astype(np.float64)
    finite = np.isfinite(both)
    if finite.all():
        return clean, malicious, 0
    lo, hi = (float(both[finite].min()), float(both[finite].max())) if finite.any() else (0.0, 0.0)
    fixed = np.where(np.isneginf(both), lo - 1.0, np.where(finite, both, hi + 1.0))
    return fixed[:len(clean)], fixed[len(clean):], int((~finite).sum())


def confusion(truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """Counts, rows = true label, columns = predicted label, both in the order of `labels` (e.g. a guard's
    verdicts benign / adversarial / backdoor on a mixed stream); a label outside `labels` is an `InputError`."""
    index = {label: i for i, label in enumerate(labels)}
    if len(truth) != len(predicted):
        raise InputError(f"{len(truth)} true labels and {len(predicted)} predicted ones; expected one of each per input")
    out = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, p in zip(truth, predicted):
        if t not in index or p not in index:
            raise InputError(f"label {t if t not in index else p!r} is not one of {', '.join(labels)}")
        out[index[t], index[p]] += 1
    return out


def confusion_accuracy(matrix: np.ndarray) -> float:
    """Share of inputs on the diagonal of a confusion matrix (NaN for an empty one)."""
    total = float(np.sum(matrix))
    return float(np.trace(matrix)) / total if total else float("nan")
