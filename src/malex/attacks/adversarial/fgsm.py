"""Fast Gradient Sign Method (Goodfellow, Shlens & Szegedy, ICLR 2015): one signed-gradient step of size eps."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from malex.attacks.adversarial.base import AdversarialAttack, input_gradient, is_number, require


@dataclass(frozen=True)
class FGSMConfig:
    """eps: the Linf budget (and step size) in [0, 1] pixel units."""

    eps: float = 0.1

    def __post_init__(self) -> None:
        require(is_number(self.eps) and 0.0 <= self.eps <= 1.0,
                f"FGSM eps is {self.eps!r}; expected a number in [0, 1]")


def ascent_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    target: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradient, logits) at `x` of the attack objective: CE(y) untargeted, -CE(target) targeted.

    Stepping along the gradient's sign raises the objective, i.e. moves x towards success.
    """
    x = x.detach().requires_grad_(True)
    logits = model(x)
    if target is None:
        objective = F.cross_entropy(logits, y, reduction="sum")
    else:
        objective = -F.cross_entropy(logits, target, reduction="sum")
    return input_gradient(objective, x), logits.detach()


class FGSM(AdversarialAttack):
    """x_adv = clip(x + eps * sign(grad CE(x, y))) untargeted; minus the gradient of CE(x, target) targeted."""

    name = "fgsm"
    config_class = FGSMConfig
    config: FGSMConfig

    def __init__(self, config: FGSMConfig | None = None) -> None:
        super().__init__(config)

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
                 generator: torch.Generator) -> torch.Tensor:
        grad, _ = ascent_gradient(model, x, y, target)
        return (x + self.config.eps * grad.sign()).clamp_(0.0, 1.0)
