"""Orthogonal PGD (Bryniarski, Hingun, Pachuca, Wang and Carlini, "Evading Adversarial Example Detection Defenses
with Orthogonal Projected Gradient Descent", ICLR 2022), in the Linf ball.

Instead of descending the sum of the classification loss and the evidence, whose gradients fight each other,
each step follows ONE of them with the other's component removed (per input, on the flattened gradients):

* not yet fooled: the classification gradient projected orthogonally to the evidence gradient, so that moving
  towards a wrong label does not raise the evidence to first order (while the evidence is above
  `-evidence_margin`; below it, the plain classification gradient);
* fooled but still flagged (evidence > -evidence_margin): the evidence gradient projected orthogonally to the
  classification gradient, so that lowering the evidence does not undo the misclassification to first order
  (with the clamped margin loss a confidently fooled input has no classification gradient: then the plain
  evidence gradient).

The settings, the random start, the projection onto the ball and the choice of the returned iterate (the fooled
iterate with the smallest evidence) are those of `adaptive_pgd`; `weight` is not used.
"""

from __future__ import annotations

import torch

from malex.attacks.adversarial.adaptive_pgd import AdaptivePGDConfig, EvidencePGD


def project_out(g: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Per input (first dimension), g minus its component along `direction` (g itself where direction is zero)."""
    flat_g, flat_d = g.flatten(1), direction.flatten(1)
    norm2 = flat_d.square().sum(dim=1, keepdim=True)
    coef = torch.where(norm2 > 0, (flat_g * flat_d).sum(dim=1, keepdim=True) / norm2.clamp_min(1e-300),
                       torch.zeros_like(norm2))
    return (flat_g - coef * flat_d).view_as(g)


class OrthogonalPGD(EvidencePGD):
    """Linf PGD that steps along the classification or the evidence gradient, each projected away from the other."""

    name = "orthogonal_pgd"
    config_class = AdaptivePGDConfig

    def _direction(self, g_cls: torch.Tensor, g_ev: torch.Tensor, evidence: torch.Tensor, fooled: torch.Tensor
                   ) -> torch.Tensor:
        shape = (-1, *([1] * (g_cls.dim() - 1)))
        flagged = (evidence + self.config.evidence_margin > 0).view(shape)
        towards_label = torch.where(flagged, project_out(g_cls, g_ev), g_cls)
        away_from_detector = project_out(g_ev, g_cls)
        return torch.where(fooled.view(shape) & flagged, away_from_detector, towards_label)
