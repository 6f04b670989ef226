"""Fit detectors on clean data, calibrate them, and score clean and malicious sets with one probe pass each."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from malex.calibration import DEFAULT_FPR, Threshold, calibrate
from malex.detectors.base import Detector
from malex.detectors.fitting import fit_observed, joint_probe, score_observed
from malex.metrics import DetectionMetrics, evaluate_scores
from malex.probe import Observation


@dataclass
class DetectionRun:
    """Scores and metrics of several detectors on a clean set and several malicious sets."""

    thresholds: dict[str, Threshold] = field(default_factory=dict)
    clean_scores: dict[str, np.ndarray] = field(default_factory=dict)
    malicious_scores: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # attack -> detector -> scores
    metrics: dict[tuple[str, str], DetectionMetrics] = field(default_factory=dict)  # (detector, attack)
    observations: dict[str, Observation] = field(default_factory=dict)

    def rows(self) -> list[tuple[str, str, DetectionMetrics]]:
        """(detector, attack, metrics) rows, detector-major."""
        return [(d, a, m) for (d, a), m in sorted(self.metrics.items(), key=lambda kv: kv[0])]


def run_detectors(
    detectors: dict[str, Detector],
    fit_x: torch.Tensor,
    calibration_x: torch.Tensor,
    clean_x: torch.Tensor,
    malicious: dict[str, torch.Tensor],
    fit_y: torch.Tensor | None = None,
    fpr: float = DEFAULT_FPR,
    progress: bool = True,
) -> DetectionRun:
    """Fit every detector on `fit_x`, set its threshold at `fpr` on `calibration_x`, score the rest.

    All detectors share one probe pass per input set (the union of the layers they read); each set is
    scored whole. `observations` keeps every set's probe pass (for plots).
    """
    model = next(iter(detectors.values())).model
    probe = joint_probe(model, detectors)
    run = DetectionRun()
    sets = {"fit": fit_x, "calibration": calibration_x, "clean": clean_x, **malicious}
    run.observations = {name: probe.run(x) for name, x in sets.items()}
    fit_observed(detectors, run.observations["fit"], fit_y, progress=progress)
    scores = {name: score_observed(detectors, obs) for name, obs in run.observations.items() if name != "fit"}
    for name in detectors:
        run.thresholds[name] = calibrate(scores["calibration"][name], fpr)
        run.clean_scores[name] = scores["clean"][name]
        for attack in malicious:
            run.malicious_scores.setdefault(attack, {})[name] = scores[attack][name]
            run.metrics[(name, attack)] = evaluate_scores(run.clean_scores[name], scores[attack][name],
                                                          run.thresholds[name])
    return run
