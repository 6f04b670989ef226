"""Detection metrics: AUROC, TPR at a fixed FPR, and the study's detection accuracy."""

from __future__ import annotations

from dataclasses import asdict, dataclass

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


def evaluate_scores(clean: np.ndarray, malicious: np.ndarray, threshold: Threshold) -> DetectionMetrics:
    """All metrics for one detector on one attack, `threshold` calibrated on a separate clean split."""
    clean, malicious = _check(clean, malicious)
    return DetectionMetrics(
        auroc=auroc(clean, malicious),
        tpr_at_1fpr=tpr_at_fpr(clean, malicious, 0.01),
        tpr_at_5fpr=tpr_at_fpr(clean, malicious, 0.05),
        clean_pass=float(1.0 - threshold.flags(clean).mean()),
        malicious_caught=float(threshold.flags(malicious).mean()),
        n_clean=int(clean.size),
        n_malicious=int(malicious.size),
    )
