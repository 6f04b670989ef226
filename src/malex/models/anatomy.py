"""Where a classifier's dense head is, for models malex did not build.

Detectors that change only dense layers (model mutation) or only what follows the features (Monte-Carlo
dropout) re-run just the head on its input, which the probe pass captures, instead of the whole model. A
malex `Classifier` keeps every dense layer in `model.head`; a foreign model may name its head anything
(`fc`, `classifier`) or make it a single `nn.Linear`. The head is found by structure: the smallest module
that holds every dense layer (and, when given, every module of `also`). Whether re-running it on its input
reproduces the model's labels is then checked on data (`head_reproduces`), since a forward pass may do more
after the head than its modules show.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from malex.models.inference import eval_mode

#: a probe layer named "NAME:in" captures the input of module NAME
INPUT_SUFFIX = ":in"


@dataclass(frozen=True)
class Head:
    """A submodule of a model that maps its input to the logits: `name` in `model.named_modules()`, and the
    probe layer that captures its input."""

    name: str
    module: nn.Module
    reason: str

    @property
    def input_layer(self) -> str:
        return self.name + INPUT_SUFFIX


def _inside(name: str, owner: str) -> bool:
    return name == owner or name.startswith(owner + ".")


def dense_layers(model: nn.Module) -> list[str]:
    """Names of the model's nn.Linear modules, in registration order."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def find_head(model: nn.Module, also: tuple[str, ...] = ()) -> Head | None:
    """The model's dense head: `model.head` when it holds every dense layer (and every module named in
    `also`), else the smallest proper submodule that does; None when only the whole model does (or there is no
    dense layer)."""
    dense = dense_layers(model)
    if not dense:
        return None
    wanted = dense + list(also)
    head = getattr(model, "head", None)
    if isinstance(head, nn.Module) and all(_inside(n, "head") for n in wanted):
        return Head("head", head, "model.head holds every dense layer")
    owners = [n for n, _ in model.named_modules() if n and all(_inside(w, n) for w in wanted)]
    if not owners:
        return None
    name = max(owners, key=len)  # the deepest module that holds them all is the smallest
    what = f"the dense layer {name!r}" if isinstance(model.get_submodule(name), nn.Linear) else f"{name!r}"
    return Head(name, model.get_submodule(name), f"{what} holds every dense layer")


def head_reproduces(head: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> bool:
    """Does re-running `head` (in eval mode) on its captured `inputs` give the model's own `labels`?"""
    with torch.no_grad(), eval_mode(head):
        return bool(torch.equal(head(inputs).argmax(dim=-1).cpu(), labels.cpu()))


def penultimate_input(model: nn.Module) -> str | None:
    """The probe layer of the features the last dense layer reads (its input), e.g. the pooled features of a
    global-pool head; None without a dense layer."""
    dense = dense_layers(model)
    return dense[-1] + INPUT_SUFFIX if dense else None
