"""Detector-aware PGD in the Linf ball: fool the model AND keep a detector's evidence below its threshold.

The attack knows the defence only as a callable `evidence(x) -> (N,)`, differentiable in x, positive where the
defence flags the input (e.g. `malex.guard.surrogate.GuardEvidence`, the guard's Fisher statistic minus its
threshold). Each step minimises, per input,

    loss(x) = max(m(x), -confidence) + weight * max(evidence(x) + evidence_margin, 0),

m being the margin of the true label over the best other (untargeted) or of the best other over the target
(targeted), as in CW: once an input is misclassified with `confidence`, only the evidence term pushes, and once
the evidence is `evidence_margin` below the threshold it stops pushing. `loss="ce"` uses minus the cross-entropy
of the label (plus the target's CE when targeted) instead of the clamped margin: with no evidence and constant
steps (`step_decay=False`) it is plain PGD step for step (the sanity check `tests/test_adaptive.py` runs). Steps
are signed gradients, of size alpha shrinking along a cosine to alpha / 100 (coarse moves first, then the fine
trade-off between the two terms), each followed by projection onto the eps ball and [0, 1], from a uniform
random start.

Of the iterates on which the model is fooled, each input keeps the one with the smallest evidence (the latest
among ties); an input never fooled gets its final iterate. Without an evidence callable the attack is a PGD on
the chosen loss (evidence 0 everywhere), so it also measures the attack against an undefended model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from malex.attacks.adversarial.base import (
    cosine_step, input_gradient, is_count, is_number, linf_project, random_start, require,
)
from malex.attacks.adversarial.cw import margin
from malex.attacks.adversarial.evidence import EvidenceAware

LOSSES = ("margin", "ce")


@dataclass(frozen=True)
class AdaptivePGDConfig:
    """eps: Linf budget; alpha: step size (None -> eps / 10); steps; weight: of the evidence term (lambda);
    evidence_margin: how far below the threshold the evidence is pushed; confidence: the margin beyond the
    boundary the classification term asks for; loss: "margin" (clamped CW margin) or "ce"; step_decay: shrink the
    step along a cosine from alpha to alpha / 100 over the steps (False: constant steps); seed: random start."""

    eps: float = 0.3
    alpha: float | None = None
    steps: int = 100
    weight: float = 0.1
    evidence_margin: float = 2.0
    confidence: float = 0.0
    loss: str = "margin"
    step_decay: bool = True
    random_start: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        name = type(self).__name__.removesuffix("Config")
        require(is_number(self.eps) and 0.0 <= self.eps <= 1.0,
                f"{name} eps is {self.eps!r}; expected a number in [0, 1]")
        require(self.alpha is None or (is_number(self.alpha) and self.alpha > 0.0),
                f"{name} alpha is {self.alpha!r}; expected None (eps / 10) or a number > 0")
        require(is_count(self.steps), f"{name} steps is {self.steps!r}; expected an int >= 1")
        require(is_number(self.weight) and self.weight >= 0.0,
                f"{name} weight is {self.weight!r}; expected a number >= 0")
        require(is_number(self.evidence_margin),
                f"{name} evidence_margin is {self.evidence_margin!r}; expected a number")
        require(is_number(self.confidence) and self.confidence >= 0.0,
                f"{name} confidence is {self.confidence!r}; expected a number >= 0")
        require(self.loss in LOSSES, f"{name} loss is {self.loss!r}; expected one of {', '.join(LOSSES)}")
        require(isinstance(self.step_decay, bool), f"{name} step_decay is {self.step_decay!r}; expected a bool")
        require(isinstance(self.random_start, bool), f"{name} random_start is {self.random_start!r}; expected a bool")
        require(is_count(self.seed, minimum=0), f"{name} seed is {self.seed!r}; expected an int >= 0")

    @property
    def step_size(self) -> float:
        """alpha, or eps / 10 when alpha is None."""
        return self.eps / 10.0 if self.alpha is None else float(self.alpha)

    def step_at(self, step: int) -> float:
        """The step size of step `step` (0-based): constant, or cosine-decayed to 1% of alpha at the last step."""
        return cosine_step(self.step_size, step, self.steps) if self.step_decay else self.step_size


def classification_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None, loss: str,
                        confidence: float) -> torch.Tensor:
    """Per-input loss that falls as the attack moves towards success: the clamped margin, or minus the CE of the
    true label (untargeted) / the CE of the target (targeted)."""
    if loss == "margin":
        return margin(logits, y if target is None else target, target is not None).clamp(min=-confidence)
    if target is None:
        return -F.cross_entropy(logits, y, reduction="none")
    return F.cross_entropy(logits, target, reduction="none")


class EvidencePGD(EvidenceAware):
    """The loop every evidence-aware PGD shares; subclasses choose each step's direction (`_direction`)."""

    config: AdaptivePGDConfig

    def _terms(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(classification gradient, evidence gradient, classification loss, evidence, logits) at x, per input."""
        cfg = self.config
        xg = x.detach().requires_grad_(True)
        logits = model(xg)
        cls = classification_loss(logits, y, target, cfg.loss, cfg.confidence)
        g_cls = input_gradient(cls.sum(), xg)
        if self.evidence is None:
            zero = torch.zeros(x.shape[0], device=x.device)
            return g_cls, torch.zeros_like(x), cls.detach(), zero, logits.detach()
        xe = x.detach().requires_grad_(True)
        ev = self.evidence_of(xe)
        g_ev = input_gradient(ev.sum(), xe)
        return g_cls, g_ev, cls.detach(), ev.detach(), logits.detach()

    def _direction(self, g_cls: torch.Tensor, g_ev: torch.Tensor, evidence: torch.Tensor, fooled: torch.Tensor
                   ) -> torch.Tensor:
        """The descent direction of one step (before its sign is taken)."""
        cfg = self.config
        active = (evidence + cfg.evidence_margin > 0).to(g_ev.dtype).view(-1, *([1] * (g_ev.dim() - 1)))
        return g_cls + cfg.weight * active * g_ev

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
                 generator: torch.Generator) -> torch.Tensor:
        eps, steps = self.config.eps, self.config.steps
        adv = random_start(x, eps, generator) if self.config.random_start and eps > 0 else x.clone()
        best = adv.clone()
        best_ev = torch.full((x.shape[0],), float("inf"), device=x.device)
        for step in range(steps + 1):
            g_cls, g_ev, _, ev, logits = self._terms(model, adv, y, target)
            pred = logits.argmax(dim=1)
            fooled = pred != y if target is None else pred == target
            keep = fooled & (ev.to(best_ev.dtype) <= best_ev)
            best[keep] = adv[keep]
            best_ev[keep] = ev[keep].to(best_ev.dtype)
            if step == steps:
                break
            adv = adv - self.config.step_at(step) * self._direction(g_cls, g_ev, ev, fooled).sign()
            adv = linf_project(adv, x, eps)
        never = torch.isinf(best_ev)
        best[never] = adv[never]
        return best


class AdaptivePGD(EvidencePGD):
    """Linf PGD on the classification loss plus `weight` times the hinged evidence (see the module docstring)."""

    name = "adaptive_pgd"
    config_class = AdaptivePGDConfig
