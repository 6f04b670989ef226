"""What every adversarial attack shares: the result type and the batched, model-safe run loop.

Attacks see images in [0, 1] (normalisation lives inside the model) and use only the model's logits.
An attack never changes the model: it switches the model to eval mode for the run and restores the
previous mode afterwards, and it asks autograd for gradients with respect to the input only, so no
parameter is written and no parameter's `.grad` is touched.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from malex.data import to_labels, to_nchw_float
from malex.device import model_device
from malex.errors import ConfigError, InputError
from malex.progress import track

ArrayLike = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class AdversarialResult:
    """The outcome of one attack run; every tensor is on the CPU and has one row per input.

    `success` is `pred != y` for an untargeted run and `pred == target` for a targeted one.
    """

    x_adv: torch.Tensor  # (N, C, H, W) float32 in [0, 1], for all inputs
    success: torch.Tensor  # (N,) bool
    pred: torch.Tensor  # (N,) int64, the model's labels on x_adv
    seconds: float  # wall time of the attack
    x: torch.Tensor  # (N, C, H, W) the clean inputs, for the perturbation norms

    def __post_init__(self) -> None:
        n = self.x_adv.shape[0]
        if self.x.shape != self.x_adv.shape:
            raise InputError(f"x has shape {tuple(self.x.shape)} but x_adv {tuple(self.x_adv.shape)}; expected equal")
        if self.success.shape != (n,) or self.pred.shape != (n,):
            raise InputError(f"success {tuple(self.success.shape)} and pred {tuple(self.pred.shape)}; expected ({n},)")

    def __len__(self) -> int:
        return int(self.x_adv.shape[0])

    @property
    def l2(self) -> torch.Tensor:
        """Per-input L2 norm of the perturbation x_adv - x."""
        return (self.x_adv - self.x).flatten(1).norm(p=2, dim=1)

    @property
    def linf(self) -> torch.Tensor:
        """Per-input Linf norm of the perturbation x_adv - x."""
        return (self.x_adv - self.x).flatten(1).abs().amax(dim=1)

    @property
    def success_rate(self) -> float:
        """Fraction of inputs on which the attack succeeded."""
        return float(self.success.float().mean()) if len(self) else math.nan

    @property
    def mean_l2(self) -> float:
        """Mean L2 perturbation over successful inputs (nan if none succeeded)."""
        return float(self.l2[self.success].mean()) if bool(self.success.any()) else math.nan

    @property
    def mean_linf(self) -> float:
        """Mean Linf perturbation over successful inputs (nan if none succeeded)."""
        return float(self.linf[self.success].mean()) if bool(self.success.any()) else math.nan

    def successful(self) -> torch.Tensor:
        """The adversarial images of the successful inputs only."""
        return self.x_adv[self.success]

    def summary(self) -> dict[str, float | int]:
        """success_rate, mean_l2, mean_linf, n and seconds as plain Python numbers (nan norms if none)."""
        return {
            "success_rate": self.success_rate,
            "mean_l2": self.mean_l2,
            "mean_linf": self.mean_linf,
            "n": len(self),
            "seconds": float(self.seconds),
        }


def require(condition: bool, message: str) -> None:
    """Raise `ConfigError(message)` unless `condition` holds (for checking attack settings)."""
    if not condition:
        raise ConfigError(message)


def is_number(value: object) -> bool:
    """True for a finite int or float (bools excluded)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_count(value: object, minimum: int = 1) -> bool:
    """True for an int (bools excluded) of at least `minimum`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def random_start(x: torch.Tensor, eps: float, generator: torch.Generator) -> torch.Tensor:
    """x plus uniform noise in [-eps, eps] (drawn on the CPU from `generator`), clipped to [0, 1]."""
    noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).mul_(2 * eps).sub_(eps)
    return (x + noise.to(x.device)).clamp_(0.0, 1.0)


def linf_project(adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """`adv` projected onto the Linf ball of radius eps around x, then onto [0, 1]."""
    return torch.min(torch.max(adv, x - eps), x + eps).clamp_(0.0, 1.0)


def cosine_step(alpha: float, step: int, steps: int) -> float:
    """The size of step `step` (0-based) of `steps`: alpha decayed along a cosine to alpha / 100 at the last."""
    if steps <= 1:
        return alpha
    return alpha * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * step / (steps - 1))))


def input_gradient(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d loss / d x without accumulating anything into the model's parameters' `.grad`."""
    (grad,) = torch.autograd.grad(loss, [x])
    return grad


class AdversarialAttack(ABC):
    """An attack on a classifier that returns logits; targeted when `run` is given `target`."""

    name: ClassVar[str]
    config_class: ClassVar[type]

    def __init__(self, config: Any = None) -> None:
        config = self.config_class() if config is None else config
        if not isinstance(config, self.config_class):
            raise ConfigError(f"{type(self).__name__} takes a {self.config_class.__name__}, "
                              f"got {type(config).__name__}")
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    @abstractmethod
    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
                 generator: torch.Generator) -> torch.Tensor:
        """Adversarial versions of one batch `x` (on the model's device), in [0, 1].

        `generator` is a CPU generator seeded once per run from the config's `seed` (0 if it has none);
        draw random numbers from it on the CPU so a run is reproducible on any device.
        """

    def run(
        self,
        model: nn.Module,
        x: ArrayLike,
        y: ArrayLike,
        target: ArrayLike | None = None,
        batch_size: int = 256,
        progress: bool = True,
    ) -> AdversarialResult:
        """Attack every input of `x` (true labels `y`), towards `target` when given, `batch_size` at a time."""
        require(is_count(batch_size), f"batch_size is {batch_size!r}; expected an int >= 1")
        shape = getattr(model, "input_shape", None)
        num_classes = getattr(model, "num_classes", None)
        x = to_nchw_float(x, shape=shape, source=f"{self.name} inputs")
        y = to_labels(y, n=x.shape[0], num_classes=num_classes, source=f"{self.name} labels")
        if target is not None:
            target = to_labels(target, n=x.shape[0], num_classes=num_classes, source=f"{self.name} targets")

        device = model_device(model)
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(int(getattr(self.config, "seed", 0)))
        adv_parts: list[torch.Tensor] = []
        pred_parts: list[torch.Tensor] = []
        try:
            starts = range(0, x.shape[0], batch_size)
            for lo in track(starts, f"{self.name} attack (batches)", enabled=progress):
                xb = x[lo:lo + batch_size].to(device)
                yb = y[lo:lo + batch_size].to(device)
                tb = None if target is None else target[lo:lo + batch_size].to(device)
                with torch.enable_grad():
                    adv = self._perturb(model, xb, yb, tb, generator).detach().clamp_(0.0, 1.0)
                with torch.no_grad():
                    pred = model(adv).argmax(dim=1)
                adv_parts.append(adv.cpu())
                pred_parts.append(pred.cpu())
        finally:
            model.train(was_training)
        seconds = time.perf_counter() - start

        x_adv = torch.cat(adv_parts)
        pred = torch.cat(pred_parts)
        success = pred != y if target is None else pred == target
        return AdversarialResult(x_adv=x_adv, success=success, pred=pred, seconds=seconds, x=x)
