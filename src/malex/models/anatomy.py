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
    """What maps a captured input to the logits: `module` (a submodule of the model, or a Sequential of the
    submodules a forward pass ends with), `name` the first of them in `model.named_modules()`, whose input the
    probe layer `input_layer` captures."""

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


def tail_chain(model: nn.Module) -> list[str]:
    """The modules the forward pass ends with, each fed by the one before and nothing else (e.g. dropout then
    the dense layer, where the forward pass calls them in a row): traced with torch.fx; [] when the model
    cannot be traced or does not end in a module call."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # any model fx cannot trace (data-dependent control flow, unsupported ops) has no chain
        return []
    node = next(n for n in graph.nodes if n.op == "output").args[0]
    chain: list[str] = []
    while (isinstance(node, torch.fx.Node) and node.op == "call_module" and len(node.args) == 1 and not node.kwargs
           and len(node.users) == 1):
        chain.append(str(node.target))
        node = node.args[0]
    return chain[::-1]


def find_head(model: nn.Module, also: tuple[str, ...] = ()) -> Head | None:
    """The model's dense head: `model.head` when it holds every dense layer (and every module named in
    `also`), else the smallest proper submodule that does, else the chain of modules the forward pass ends
    with (`tail_chain`) when it holds them all; None when only the whole model does (or there is no dense
    layer)."""
    dense = dense_layers(model)
    if not dense:
        return None
    wanted = dense + list(also)
    head = getattr(model, "head", None)
    if isinstance(head, nn.Module) and all(_inside(n, "head") for n in wanted):
        return Head("head", head, "model.head holds every dense layer")
    owners = [n for n, _ in model.named_modules() if n and all(_inside(w, n) for w in wanted)]
    if not owners:
        chain = tail_chain(model)
        if not chain or not all(any(_inside(w, c) for c in chain) for w in wanted):
            return None
        modules = [model.get_submodule(c) for c in chain]
        return Head(chain[0], modules[0] if len(modules) == 1 else nn.Sequential(*modules),
                    f"the forward pass ends with {' -> '.join(chain)}, which hold every dense layer")
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


def input_channels(model: nn.Module) -> int | None:
    """The channels the model's inputs have, read off its first Conv2d (in registration order); None without one."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return int(conv.in_channels) if conv is not None else None
