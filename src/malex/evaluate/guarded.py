"""Metrics of a fitted guard and of each of its detectors on clean and malicious sets."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from malex.calibration import calibrate
from malex.evaluate.detection import DetectionRun
from malex.metrics import DetectionMetrics, evaluate_scores
from malex.guard.guard import Guard, Screening
from malex.probe import Observation

GUARD_ROW = "guard"


@dataclass
class ScreenedSets:
    """One probe pass and one screening per named set of inputs, by the same guard."""

    guard: Guard
    observations: dict[str, Observation]
    screenings: dict[str, Screening]

    def detection_run(self, clean: str = "clean") -> DetectionRun:
        """Every detector's and the guard's metrics on each other set against the set named `clean`: each
        detector thresholded at the guard's FPR on its own calibration scores, the guard at its threshold."""
        g, base = self.guard, self.screenings[clean]
        run = DetectionRun(observations=self.observations)
        for name in g.detectors:
            run.thresholds[name] = calibrate(g.calibration_scores_[name], g.config.fpr)
            run.clean_scores[name] = base.scores[name]
        run.thresholds[GUARD_ROW], run.clean_scores[GUARD_ROW] = g.threshold_, base.guard_score
        for attack, screened in self.screenings.items():
            if attack == clean:
                continue
            scores = {**screened.scores, GUARD_ROW: screened.guard_score}
            for name, s in scores.items():
                run.malicious_scores.setdefault(attack, {})[name] = s
                run.metrics[(name, attack)] = evaluate_scores(run.clean_scores[name], s, run.thresholds[name])
        return run


def screen_sets(guard: Guard, sets: dict[str, torch.Tensor]) -> ScreenedSets:
    """Probe and screen each set once with `guard`."""
    observations = {name: guard.observe(x) for name, x in sets.items()}
    return ScreenedSets(guard, observations, {n: guard.screen_observation(o) for n, o in observations.items()})


def evaluate_guard(guard: Guard, clean_x: torch.Tensor, malicious: dict[str, torch.Tensor]
                   ) -> list[tuple[str, str, DetectionMetrics]]:
    """(detector or 'guard', attack, metrics) rows, in the guard's detector order with the guard last per attack;
    each detector thresholded at the guard's FPR on its own calibration scores, the guard at its threshold."""
    clean = "\0clean"  # a name no attack can have
    run = screen_sets(guard, {clean: clean_x, **malicious}).detection_run(clean)
    order = [*guard.detectors, GUARD_ROW]
    return [(name, attack, run.metrics[(name, attack)]) for attack in malicious for name in order]
