"""Malicious examples a guard makes for itself at fit time, from its own clean inputs and the model it guards.

A deployed guard holds the model, so it can always craft adversarial examples and reverse-engineer universal
triggers (as Neural Cleanse does); it knows nothing of the attacks it will meet. These examples teach the guard
which pattern of per-detector evidence means "adversarial" and which means "backdoor"
(`malex.guard.kind_model`).

* adversarial: untargeted PGD-Linf at a few budgets (fixed-budget examples deep past the boundary) and PGD
  stopped at each input's first success (examples just past it);
* backdoor-like: inputs stamped with a universal patch (a small square in a corner) or blended with a universal
  full-image pattern, each optimised to send clean inputs of other classes to one target class. A trigger is
  kept only when it sends at least `min_success` of those inputs to its target, as a planted backdoor's trigger
  does and a universal adversarial patch on a clean model rarely does (Neural Cleanse's reasoning); of a kept
  trigger, the stamped inputs the model sends to the target are the examples. A model with no such trigger
  gives none, and the guard keeps its evidence rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from malex.attacks.adversarial import make_adversarial
from malex.errors import ConfigError
from malex.models.inference import eval_mode, model_device, predict_logits


@dataclass(frozen=True)
class StandInConfig:
    """How many clean inputs the guard attacks (`n_inputs`, a seeded random choice of its fit inputs), the PGD
    budgets (Linf, in [0, 1] pixel units; `pgd_steps` each, step eps / 4; early-stopped PGD at step eps / 10
    for each budget), and the universal triggers: up to `n_targets` target classes (every class of a model with
    no more; else a seeded random choice), optimised on `trigger_inputs` of the inputs, a patch of `patch_fraction` of
    the image side in each corner and a full-image blend at `blend_alpha`, each optimised for `trigger_steps`
    Adam steps and kept when it sends at least `min_success` of the other classes' inputs to its target.
    `no_trigger`: how a guard that found no such trigger types flagged inputs: by the evidence rule
    ("evidence"), or all as adversarial ("adversarial": no universal trigger works, so by Neural Cleanse's
    reasoning the model shows no sign of a backdoor). `with_trigger`: how a guard that found one types them: by the
    logistic regression fitted on the self-made examples ("learned") or by the evidence rule ("evidence"; the
    trigger search then only tells whether the model shows a sign of a backdoor)."""

    n_inputs: int = 300
    pgd_eps: tuple[float, ...] = (0.05, 0.1, 0.3)
    pgd_steps: int = 10
    n_targets: int = 10
    trigger_inputs: int = 200
    patch_fraction: float = 0.25
    blend_alpha: float = 0.25
    trigger_steps: int = 40
    lr: float = 0.1
    min_success: float = 0.8
    no_trigger: str = "evidence"
    with_trigger: str = "learned"

    def __post_init__(self) -> None:
        if isinstance(self.n_inputs, bool) or not isinstance(self.n_inputs, int) or self.n_inputs < 10:
            raise ConfigError(f"stand-in n_inputs is {self.n_inputs!r}; expected an int >= 10")
        if not self.pgd_eps or not all(0 < e <= 1 for e in self.pgd_eps):
            raise ConfigError(f"stand-in pgd_eps are {self.pgd_eps!r}; expected budgets in (0, 1]")
        if not 0 < self.patch_fraction < 1 or not 0 < self.blend_alpha < 1 or not 0 <= self.min_success <= 1:
            raise ConfigError("stand-in patch_fraction and blend_alpha must lie in (0, 1), min_success in [0, 1]")
        if self.no_trigger not in ("evidence", "adversarial"):
            raise ConfigError(f"stand-in no_trigger is {self.no_trigger!r}; expected 'evidence' or 'adversarial'")
        if self.with_trigger not in ("learned", "evidence"):
            raise ConfigError(f"stand-in with_trigger is {self.with_trigger!r}; expected 'learned' or 'evidence'")


def adversarial_stand_ins(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, config: StandInConfig,
                          seed: int) -> torch.Tensor:
    """Successful untargeted PGD examples of `x` (labelled `labels`) at every budget, fixed and early-stopped."""
    out = []
    for i, eps in enumerate(config.pgd_eps):
        for settings in ({"alpha": eps / 4, "random_start": True, "seed": seed + i},
                         {"alpha": eps / 10, "random_start": False, "early_stop": True}):
            attack = make_adversarial("pgd", eps=eps, steps=config.pgd_steps, **settings)
            out.append(attack.run(model, x, labels, progress=False).successful())
    return torch.cat(out)


def _stamp(x: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x * (1 - mask) + pattern * mask


def _optimise_trigger(model: nn.Module, x: torch.Tensor, target: int, mask: torch.Tensor, config: StandInConfig,
                      gen: torch.Generator) -> torch.Tensor:
    """A pattern (same shape as one input) that, stamped through `mask`, sends `x` to `target`."""
    device = model_device(model)
    raw = torch.randn((1, *x.shape[1:]), generator=gen).to(device).requires_grad_(True)
    opt = torch.optim.Adam([raw], lr=config.lr)
    xs, m = x.to(device), mask.to(device)
    goal = torch.full((len(x),), target, dtype=torch.long, device=device)
    with eval_mode(model):
        for _ in range(config.trigger_steps):
            loss = nn.functional.cross_entropy(model(_stamp(xs, torch.sigmoid(raw), m)), goal)
            (grad,) = torch.autograd.grad(loss, [raw])
            opt.zero_grad()
            raw.grad = grad
            opt.step()
    return torch.sigmoid(raw.detach()).cpu()


def backdoor_stand_ins(model: nn.Module, x: torch.Tensor, predicted: torch.Tensor, config: StandInConfig,
                       seed: int) -> torch.Tensor:
    """Inputs of `x` stamped with universal patches (one per corner) and blended with a universal pattern, each
    optimised toward each of up to `n_targets` target classes; of the triggers that send at least `min_success` of the
    inputs to their target, the stamped inputs the model sends there."""
    gen = torch.Generator().manual_seed(seed)
    _, c, h, w = x.shape
    classes = int(predict_logits(model, x[:1]).shape[1])
    targets = torch.randperm(classes, generator=gen)[: min(config.n_targets, classes)].tolist()
    x, predicted = x[:config.trigger_inputs], predicted[:config.trigger_inputs]
    side_h, side_w = max(1, round(config.patch_fraction * h)), max(1, round(config.patch_fraction * w))
    masks = []
    for top, left in ((0, 0), (0, w - side_w), (h - side_h, 0), (h - side_h, w - side_w)):
        m = torch.zeros(1, 1, h, w)
        m[..., top:top + side_h, left:left + side_w] = 1.0
        masks.append(m)
    masks.append(torch.full((1, 1, h, w), config.blend_alpha))
    out = []
    for target in targets:
        others = x[predicted != target]
        if not len(others):
            continue
        for mask in masks:
            stamped = _stamp(others, _optimise_trigger(model, others, target, mask, config, gen), mask).clamp(0, 1)
            hit = predict_logits(model, stamped).argmax(1) == target
            if float(hit.float().mean()) >= config.min_success:
                out.append(stamped[hit])
    return torch.cat(out) if out else x[:0]
