"""Detector-aware Carlini & Wagner L2: the CW objective plus the defence's hinged evidence.

Adam minimises, over w with x_adv = (tanh(w) + 1) / 2,

    ||x_adv - x||^2 + c * (max(f(x_adv), -kappa) + weight * max(evidence(x_adv) + evidence_margin, 0)),

with CW's margin loss f and its binary search over c; an iterate counts as a success (a candidate for the
smallest-L2 example, and for the binary search) only when it fools the model by kappa AND its evidence is below
zero (the defence, as the evidence callable sees it, passes it). Inputs that never succeed come back unchanged.
The evidence callable is the one of `adaptive_pgd` (`malex.attacks.adversarial.evidence`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from malex.attacks.adversarial.base import is_number, require
from malex.attacks.adversarial.cw import CW, CWConfig
from malex.attacks.adversarial.evidence import EvidenceAware


@dataclass(frozen=True)
class AdaptiveCWConfig(CWConfig):
    """CW's settings plus weight: of the evidence term; evidence_margin: how far below the threshold it is pushed."""

    weight: float = 1.0
    evidence_margin: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        require(is_number(self.weight) and self.weight >= 0.0,
                f"AdaptiveCW weight is {self.weight!r}; expected a number >= 0")
        require(is_number(self.evidence_margin),
                f"AdaptiveCW evidence_margin is {self.evidence_margin!r}; expected a number")


class AdaptiveCW(EvidenceAware, CW):
    """CW-L2 that also keeps the defence's evidence below its threshold (see the module docstring)."""

    name = "adaptive_cw"
    config_class = AdaptiveCWConfig
    config: AdaptiveCWConfig

    def _defence(self, adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ev = self.evidence_of(adv)
        penalty = self.config.weight * (ev + self.config.evidence_margin).clamp(min=0.0)
        return penalty.to(adv.dtype), (ev < 0).detach()
