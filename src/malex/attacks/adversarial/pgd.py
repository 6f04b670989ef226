"""Projected Gradient Descent in the Linf ball (Madry et al., ICLR 2018).

Repeated signed-gradient steps of size alpha, each followed by projection onto the eps ball around x and
onto [0, 1], optionally from a uniform random start inside the ball. For each input the attack returns
the last iterate on which it succeeded (with `early_stop`, the first one: an example just past the
decision boundary rather than a confident one), or the final iterate if it never did.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from malex.attacks.adversarial.base import (
    AdversarialAttack, is_count, is_number, linf_project, random_start, require,
)
from malex.attacks.adversarial.fgsm import ascent_gradient


@dataclass(frozen=True)
class PGDConfig:
    """eps: Linf budget; alpha: step size (None -> eps / 4); steps: iterations; seed: for the random start;
    early_stop: keep each input's first successful iterate instead of its last."""

    eps: float = 0.1
    alpha: float | None = None
    steps: int = 40
    random_start: bool = True
    seed: int = 0
    early_stop: bool = False

    def __post_init__(self) -> None:
        require(is_number(self.eps) and 0.0 <= self.eps <= 1.0, f"PGD eps is {self.eps!r}; expected a number in [0, 1]")
        require(self.alpha is None or (is_number(self.alpha) and self.alpha > 0.0),
                f"PGD alpha is {self.alpha!r}; expected None (eps / 4) or a number > 0")
        require(is_count(self.steps), f"PGD steps is {self.steps!r}; expected an int >= 1")
        require(isinstance(self.random_start, bool), f"PGD random_start is {self.random_start!r}; expected a bool")
        require(is_count(self.seed, minimum=0), f"PGD seed is {self.seed!r}; expected an int >= 0")
        require(isinstance(self.early_stop, bool), f"PGD early_stop is {self.early_stop!r}; expected a bool")

    @property
    def step_size(self) -> float:
        """alpha, or eps / 4 when alpha is None."""
        return self.eps / 4.0 if self.alpha is None else float(self.alpha)


class PGD(AdversarialAttack):
    """Linf PGD, untargeted (raise CE of y) or targeted (lower CE of target)."""

    name = "pgd"
    config_class = PGDConfig
    config: PGDConfig

    def __init__(self, config: PGDConfig | None = None) -> None:
        super().__init__(config)

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
                 generator: torch.Generator) -> torch.Tensor:
        eps, alpha, steps = self.config.eps, self.config.step_size, self.config.steps
        adv = random_start(x, eps, generator) if self.config.random_start and eps > 0 else x.clone()
        best = adv.clone()
        ever = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for step in range(steps + 1):
            if step < steps:
                grad, logits = ascent_gradient(model, adv, y, target)
            else:
                with torch.no_grad():
                    logits = model(adv)
            pred = logits.argmax(dim=1)
            hit = pred != y if target is None else pred == target
            keep = hit & ~ever if self.config.early_stop else hit
            best[keep] = adv[keep]  # the first (early_stop) or latest iterate that succeeded
            ever |= hit
            if step < steps:
                adv = adv + alpha * grad.sign()
                adv = linf_project(adv, x, eps)
        best[~ever] = adv[~ever]  # never succeeded: the final iterate
        return best
