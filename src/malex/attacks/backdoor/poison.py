"""Poisoned training data, the attack success rate of a backdoored model and its successful trigger inputs."""

from __future__ import annotations

import torch
from torch import nn

from malex.attacks.backdoor.base import PoisonConfig, Trigger
from malex.attacks.crafted import Crafted
from malex.data.dataset import Split
from malex.errors import ConfigError
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


def successful_triggered(model: nn.Module, data: Split, trigger: Trigger, target: int, limit: int | None = None
                         ) -> Crafted:
    """The inputs of `data` whose true label is not `target`, with the trigger stamped, that `model` labels
    `target` (the first `limit` of them, in order, when given). The summary: success_rate over every stamped
    input, n kept, n_tried (the stamped inputs)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit is {limit!r}; expected None or an int >= 1")
    index = torch.nonzero(data.y != target).flatten()
    stamped = trigger.apply(data.x[index])
    hit = predict(model, stamped) == target
    kept = torch.nonzero(hit).flatten()[:limit]
    summary = {"success_rate": float(hit.float().mean()) if len(hit) else float("nan"), "n": len(kept),
               "n_tried": len(index)}
    return Crafted(stamped[kept], index[kept], torch.full((len(kept),), target, dtype=torch.long), summary)
