"""Metrics of a fitted guard and of each of its detectors on clean and malicious sets."""

from __future__ import annotations

import torch

from malex.calibration import calibrate
from malex.metrics import DetectionMetrics, evaluate_scores
from malex.guard.guard import Guard

GUARD_ROW = "guard"


def evaluate_guard(guard: Guard, clean_x: torch.Tensor, malicious: dict[str, torch.Tensor]
                   ) -> list[tuple[str, str, DetectionMetrics]]:
    """(detector or 'guard', attack, metrics) rows; each detector thresholded at the guard's FPR on its
    own calibration scores, the guard at its calibrated threshold."""
    clean = guard.screen(clean_x)
    rows = []
    for attack, x in malicious.items():
        screened = guard.screen(x)
        for name in guard.detectors:
            threshold = calibrate(guard.calibration_scores_[name], guard.config.fpr)
            rows.append((name, attack, evaluate_scores(clean.scores[name], screened.scores[name], threshold)))
        rows.append((GUARD_ROW, attack, evaluate_scores(clean.guard_score, screened.guard_score, guard.threshold_)))
    return rows
