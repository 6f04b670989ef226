"""Carlini & Wagner's L2 attack (IEEE S&P 2017), vectorised over a batch.

The image is written as x_adv = (tanh(w) + 1) / 2, so it stays in [0, 1] without clipping, and Adam
minimises ||x_adv - x||^2 + c * f(x_adv) over w with the margin loss f6 on the logits Z:

    untargeted: f = max(Z_y - max_{i != y} Z_i, -kappa)
    targeted:   f = max(max_{i != t} Z_i - Z_t, -kappa)

A binary search over c runs per input: c shrinks towards the smallest value that still succeeds and
grows (x10) while no success has been found. Every iterate that succeeds with margin beyond kappa is a
candidate; the one with the smallest L2 distance is kept. Inputs that never succeed come back unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from malex.attacks.adversarial.base import AdversarialAttack, input_gradient, is_count, is_number, require

_TANH_SHRINK = 1.0 - 1e-6  # keeps atanh finite for pixels at exactly 0 or 1


@dataclass(frozen=True)
class CWConfig:
    """confidence: kappa; c: initial trade-off constant; steps: Adam steps per binary-search step."""

    confidence: float = 0.0
    c: float = 1.0
    steps: int = 100
    lr: float = 0.01
    binary_search_steps: int = 5
    abort_early: bool = True

    def __post_init__(self) -> None:
        require(is_number(self.confidence) and self.confidence >= 0.0,
                f"CW confidence is {self.confidence!r}; expected a number >= 0")
        require(is_number(self.c) and self.c > 0.0, f"CW c is {self.c!r}; expected a number > 0")
        require(is_count(self.steps), f"CW steps is {self.steps!r}; expected an int >= 1")
        require(is_number(self.lr) and self.lr > 0.0, f"CW lr is {self.lr!r}; expected a number > 0")
        require(is_count(self.binary_search_steps),
                f"CW binary_search_steps is {self.binary_search_steps!r}; expected an int >= 1")
        require(isinstance(self.abort_early, bool), f"CW abort_early is {self.abort_early!r}; expected a bool")


def margin(logits: torch.Tensor, label: torch.Tensor, targeted: bool) -> torch.Tensor:
    """Per-input margin that is negative once the attack succeeds.

    Untargeted: Z_label - max_{i != label} Z_i; targeted: max_{i != label} Z_i - Z_label.
    """
    own = logits.gather(1, label[:, None]).squeeze(1)
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, label[:, None], True)
    other = logits.masked_fill(mask, float("-inf")).amax(dim=1)
    return other - own if targeted else own - other


def to_tanh_space(x: torch.Tensor) -> torch.Tensor:
    """w with (tanh(w) + 1) / 2 equal to x up to ~1e-6."""
    return torch.atanh((2.0 * x - 1.0) * _TANH_SHRINK)


def from_tanh_space(w: torch.Tensor) -> torch.Tensor:
    """The image (tanh(w) + 1) / 2, in [0, 1]."""
    return (torch.tanh(w) + 1.0) / 2.0


class Adam:
    """Adam (Kingma & Ba, 2015) on one tensor, elementwise, so every input in a batch is optimised on its own.

    Written out here rather than taken from torch.optim: it is a few lines, and the first torch.optim step in
    a process pays a one-off import of torch._dynamo (over a second on a small CPU).
    """

    def __init__(self, param: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.param, self.lr, self.betas, self.eps = param, lr, betas, eps
        self.m = torch.zeros_like(param)
        self.v = torch.zeros_like(param)
        self.t = 0

    @torch.no_grad()
    def step(self, grad: torch.Tensor) -> None:
        """Move the parameter (in place) one step against `grad`."""
        b1, b2 = self.betas
        self.t += 1
        self.m.mul_(b1).add_(grad, alpha=1.0 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1.0 - b2)
        m_hat = self.m / (1.0 - b1 ** self.t)
        v_hat = self.v / (1.0 - b2 ** self.t)
        self.param.sub_(self.lr * m_hat / (v_hat.sqrt() + self.eps))


class CW(AdversarialAttack):
    """Carlini-Wagner L2 with per-input binary search over c; untargeted, or targeted when given targets."""

    name = "cw"
    config_class = CWConfig
    config: CWConfig

    def __init__(self, config: CWConfig | None = None) -> None:
        super().__init__(config)

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
                 generator: torch.Generator) -> torch.Tensor:
        cfg = self.config
        n = x.shape[0]
        targeted = target is not None
        label = target if targeted else y
        w0 = to_tanh_space(x)
        const = torch.full((n,), float(cfg.c), device=x.device)
        lower = torch.zeros(n, device=x.device)
        upper = torch.full((n,), float("inf"), device=x.device)
        best_l2 = torch.full((n,), float("inf"), device=x.device)
        best_adv = x.clone()
        for _ in range(cfg.binary_search_steps):
            found = self._optimise(model, x, w0, label, targeted, const, best_l2, best_adv)
            upper = torch.where(found, torch.minimum(upper, const), upper)
            lower = torch.where(found, lower, torch.maximum(lower, const))
            const = torch.where(torch.isfinite(upper), (lower + upper) / 2.0, const * 10.0)
        return best_adv

    def _defence(self, adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(penalty added to the margin term, which inputs pass the defence) at `adv`: none here (zero penalty,
        all pass); detector-aware subclasses (`adaptive_cw`) add the defence's evidence."""
        return torch.zeros(adv.shape[0], device=adv.device), torch.ones(adv.shape[0], dtype=torch.bool,
                                                                       device=adv.device)

    def _optimise(self, model: nn.Module, x: torch.Tensor, w0: torch.Tensor, label: torch.Tensor, targeted: bool,
                  const: torch.Tensor, best_l2: torch.Tensor, best_adv: torch.Tensor) -> torch.Tensor:
        """One Adam run from w0 at constants `const`; updates best_l2/best_adv in place.

        Returns which inputs succeeded at least once during the run.
        """
        cfg = self.config
        kappa = float(cfg.confidence)
        w = w0.clone().requires_grad_(True)
        optimiser = Adam(w, lr=cfg.lr)
        found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        previous = torch.full((x.shape[0],), float("inf"), device=x.device)
        check_every = max(1, cfg.steps // 10)
        for step in range(cfg.steps):
            adv = from_tanh_space(w)
            m = margin(model(adv), label, targeted)
            dist = (adv - x).flatten(1).pow(2).sum(dim=1)
            penalty, passes = self._defence(adv)
            loss = dist + const * ((m + kappa).clamp(min=0.0) + penalty)  # f6 shifted by kappa: same gradient, >= 0
            with torch.no_grad():
                success = (m < -kappa) & passes
                l2 = dist.sqrt()
                better = success & (l2 < best_l2)
                best_l2[better] = l2[better]
                best_adv[better] = adv.detach()[better]
                found |= success
                if cfg.abort_early and step % check_every == 0:
                    if bool((loss >= previous * 0.9999).all()):  # no input improved by 0.01%
                        break
                    previous = loss.detach().clone()
            optimiser.step(input_gradient(loss.sum(), w))
        return found
