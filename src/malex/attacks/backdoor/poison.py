"""Poisoned training data and the attack success rate of a backdoored model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from malex.attacks.backdoor.base import Trigger
from malex.data.dataset import Split
from malex.errors import ConfigError
from malex.models.inference import predict


@dataclass(frozen=True)
class PoisonConfig:
    """Stamp the trigger on a `rate` share of the training inputs and relabel them `target`."""

    rate: float = 0.1
    target: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.rate < 1.0:
            raise ConfigError(f"poisoning rate is {self.rate}; expected a value in (0, 1)")
        if self.target < 0:
            raise ConfigError(f"target label is {self.target}; expected a class id >= 0")


def poison_split(data: Split, trigger: Trigger, config: PoisonConfig) -> tuple[Split, torch.Tensor]:
    """A copy of `data` in which a `rate` share of non-target inputs carry the trigger and label `target`.

    Returns the poisoned split and the indices that were poisoned.
    """
    candidates = torch.nonzero(data.y != config.target).flatten()
    n = int(round(config.rate * len(data)))
    if n < 1 or n > len(candidates):
        raise ConfigError(f"cannot poison {n} of {len(candidates)} non-target inputs; adjust the rate")
    gen = torch.Generator().manual_seed(config.seed)
    chosen = candidates[torch.randperm(len(candidates), generator=gen)[:n]]
    x, y = data.x.clone(), data.y.clone()
    x[chosen] = trigger.apply(x[chosen])
    y[chosen] = config.target
    return Split(x, y), chosen


def triggered_inputs(data: Split, trigger: Trigger, target: int) -> Split:
    """The inputs whose true label is not `target`, with the trigger stamped (labels kept as truth)."""
    keep = data.y != target
    return Split(trigger.apply(data.x[keep]), data.y[keep])


def attack_success_rate(model: nn.Module, data: Split, trigger: Trigger, target: int) -> float:
    """Share of non-target test inputs that the model labels `target` once the trigger is applied."""
    stamped = triggered_inputs(data, trigger, target)
    return float((predict(model, stamped.x) == target).float().mean())
