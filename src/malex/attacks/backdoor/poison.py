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


def attack_source_index(data: Split, trigger: Trigger, target: int) -> torch.Tensor:
    """Indices of the inputs of `data` on which `trigger`'s backdoor is measured (`trigger.attack_sources`:
    by default every input whose true label is not `target`; a source-specific trigger's source classes)."""
    mask = trigger.attack_sources(data.y, target)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != data.y.shape:
        raise TypeError(f"{type(trigger).__name__}.attack_sources returned {mask!r:.80}; expected a bool tensor "
                        f"of shape {tuple(data.y.shape)}")
    return torch.nonzero(mask).flatten()


def triggered_inputs(data: Split, trigger: Trigger, target: int) -> Split:
    """The inputs the backdoor is meant to send to `target` (by default those whose true label is not `target`;
    see `Trigger.attack_sources`), with the trigger stamped (labels kept as truth)."""
    index = attack_source_index(data, trigger, target)
    return Split(trigger.apply(data.x[index]), data.y[index])


def attack_success_rate(model: nn.Module, data: Split, trigger: Trigger, target: int) -> float:
    """Share of the trigger's source inputs in `data` (by default the non-target ones; a source-specific
    trigger's source classes) that the model labels `target` once the trigger is applied (NaN if there are none)."""
    stamped = triggered_inputs(data, trigger, target)
    return float((predict(model, stamped.x) == target).float().mean())


def successful_triggered(model: nn.Module, data: Split, trigger: Trigger, target: int, limit: int | None = None
                         ) -> Crafted:
    """The trigger's source inputs of `data` (by default those whose true label is not `target`; see
    `Trigger.attack_sources`), with the trigger stamped, that `model` labels `target` (the first `limit` of
    them, in order, when given). The summary: success_rate over every stamped input, n kept, n_tried (the
    stamped inputs)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit is {limit!r}; expected None or an int >= 1")
    index = attack_source_index(data, trigger, target)
    stamped = trigger.apply(data.x[index])
    hit = predict(model, stamped) == target
    kept = torch.nonzero(hit).flatten()[:limit]
    summary = {"success_rate": float(hit.float().mean()) if len(hit) else float("nan"), "n": len(kept),
               "n_tried": len(index)}
    return Crafted(stamped[kept], index[kept], torch.full((len(kept),), target, dtype=torch.long), summary)
