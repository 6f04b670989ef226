"""Poisoned training data and the attack success rate of a backdoored model."""

from __future__ import annotations

import torch
from torch import nn

from malex.attacks.backdoor.base import PoisonConfig, Trigger
from malex.data.dataset import Split
from malex.models.inference import predict


def poison_split(data: Split, trigger: Trigger, config: PoisonConfig) -> tuple[Split, torch.Tensor]:
    """A poisoned copy of `data` built by `trigger.poison` (by default a `rate` share of non-target inputs
    carry the trigger and label `target`; see each trigger for its training-time behaviour).

    Returns the poisoned split and the indices that carry the trigger and the target label.
    """
    return trigger.poison(data, config)


def triggered_inputs(data: Split, trigger: Trigger, target: int) -> Split:
    """The inputs whose true label is not `target`, with the trigger stamped (labels kept as truth)."""
    keep = data.y != target
    return Split(trigger.apply(data.x[keep]), data.y[keep])


def attack_success_rate(model: nn.Module, data: Split, trigger: Trigger, target: int) -> float:
    """Share of non-target test inputs that the model labels `target` once the trigger is applied."""
    stamped = triggered_inputs(data, trigger, target)
    return float((predict(model, stamped.x) == target).float().mean())
