"""Where a classifier's dense head is, for models malex did not build.

Detectors that change only dense layers (model mutation) or only what follows the features (Monte-Carlo
dropout) re-run just the head on its input, which the probe pass captures, instead of the whole model. A
malex `Classifier` keeps every dense layer in `model.head`; a foreign model may name its head anything
(`fc`, `classifier`) or make it a single `nn.Linear`. The head is found by structure: the smallest module
that holds every dense layer (and, when given, every module of `also`). Whether re-running it on its input
reproduces the model's labels is then checked on data (`head_reproduces`), since a forward pass may do more
after the head than its modules show.

The feature-space detectors of a foreign model read its stage outputs (`stage_layers`): the values on the main
path of a traced dummy pass that leave a block (after its activation, after its residual sum), not raw conv
outputs. A model that declares its input layout is read by it; one that does not, by its first convolution's
input channels (`input_channels`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd

from malex.device import model_device
from malex.models.inference import eval_mode

#: a probe layer named "NAME:in" captures the input of module NAME
INPUT_SUFFIX = ":in"
#: layers whose outputs are raw (before the activation): the value entering one is a block's output
RAW_LAYERS = (_ConvNd, nn.Linear, _NormBase, nn.GroupNorm, nn.LayerNorm)
#: square image sizes tried for the dummy pass of a model that declares no input_shape
DUMMY_SIZES = (32, 28, 64, 224, 16, 8)
#: most stage layers chosen (the penultimate features included), and their most total width (channels after
#: spatial pooling; a tied covariance over them costs width^2)
STAGE_BUDGET = 6
WIDTH_BUDGET = 4096


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


def head_reproduces(head: nn.Module, inputs: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor) -> bool:
    """Does re-running `head` (in eval mode) on its captured `inputs` (one tensor, or one per argument) give the
    model's own `labels`?"""
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    with torch.no_grad(), eval_mode(head):
        return bool(torch.equal(head(*args).argmax(dim=-1).cpu(), labels.cpu()))


def penultimate_input(model: nn.Module) -> str | None:
    """The probe layer of the features the last dense layer reads (its input), e.g. the pooled features of a
    global-pool head; None without a dense layer."""
    dense = dense_layers(model)
    return dense[-1] + INPUT_SUFFIX if dense else None


def input_channels(model: nn.Module) -> int | None:
    """The channels the model's inputs have, read off its first Conv2d (in registration order); None without one."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return int(conv.in_channels) if conv is not None else None


def _dummy_pass(model: nn.Module) -> tuple[torch.fx.GraphModule, tuple[int, ...]]:
    """The model traced with torch.fx, its nodes' shapes propagated by a one-input dummy pass (in eval mode) of
    its `input_shape`, or of its first convolution's channels at the first of DUMMY_SIZES it accepts. Raises
    `ValueError` saying why when the model cannot be traced or run."""
    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception as exc:  # data-dependent control flow, unsupported ops: fx raises many kinds of errors
        raise ValueError(f"torch.fx cannot trace it: {' '.join(str(exc).split())[:200]}") from exc
    declared = getattr(model, "input_shape", None)
    channels = input_channels(model)
    if declared is not None:
        shapes = [tuple(int(s) for s in declared)]
    elif channels is not None:
        shapes = [(channels, size, size) for size in DUMMY_SIZES]
    else:
        raise ValueError("it declares no input_shape and has no Conv2d to read its input channels from")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    with torch.no_grad(), eval_mode(model):
        for shape in shapes:
            try:
                ShapeProp(traced).propagate(torch.zeros((1, *shape), dtype=dtype, device=model_device(model)))
                return traced, shape
            except Exception:  # a size the model does not take fails inside its own layers, in any way
                continue
    raise ValueError(f"no dummy input of shape {' or '.join(map(str, shapes))} runs through it")


def _data_nodes(graph: torch.fx.Graph) -> tuple[list[torch.fx.Node], set[torch.fx.Node]]:
    """The nodes computed from the input, in the graph's order, and among them the main path: those every path
    from the input to the output passes through (no edge jumps over them), i.e. block boundaries, not the
    inside of a residual branch."""
    nodes = list(graph.nodes)
    place = {n: i for i, n in enumerate(nodes)}
    start = next((n for n in nodes if n.op == "placeholder"), None)
    data: dict[torch.fx.Node, None] = {}
    path, reach = set(), 0
    for i, node in enumerate(nodes):
        if node is not start and not any(a in data for a in node.all_input_nodes):
            continue
        data[node] = None
        if reach <= i:
            path.add(node)
        reach = max([reach, *(place[u] for u in node.users)])
    return [n for n in data if n.op not in ("placeholder", "output")], path


def capture_name(node: torch.fx.Node, last_call: dict[str, torch.fx.Node]) -> str | None:
    """The probe layer that captures `node`'s value: the module's output when `node` is that module's last call
    (a hook keeps the last), else the input of a module whose last call reads it first; None when only
    functions read it."""
    if node.op == "call_module" and last_call[str(node.target)] is node:
        return str(node.target)
    for user in node.users:
        if user.op == "call_module" and user.args and user.args[0] is node and last_call[str(user.target)] is user:
            return str(user.target) + INPUT_SUFFIX
    return None


@dataclass(frozen=True)
class _Point:
    """A value of the dummy pass that a probe layer captures: on the main path (a block's output) or inside a
    residual branch (an activation that enters the branch's next layer)."""

    layer: str
    shape: tuple[int, ...]
    on_path: bool


def _block_points(model: nn.Module, graph: torch.fx.Graph) -> list[_Point]:
    """Each 4-D value past the first raw layer (conv, dense, normalisation) that is no raw layer's output and
    enters a raw layer, or on the main path branches (a residual block starts there), in the graph's order."""
    modules = dict(model.named_modules())

    def raw(node: torch.fx.Node) -> bool:
        return node.op == "call_module" and isinstance(modules[str(node.target)], RAW_LAYERS)

    last_call = {str(n.target): n for n in graph.nodes if n.op == "call_module"}
    data, path = _data_nodes(graph)
    found, after_raw = [], False
    for node in data:
        meta = node.meta.get("tensor_meta")
        shape = tuple(meta.shape) if hasattr(meta, "shape") else ()
        if raw(node):
            after_raw = True
            continue
        enters = all(raw(u) for u in node.users) or (node in path and len(node.users) > 1)
        name = capture_name(node, last_call) if after_raw and len(shape) == 4 and enters else None
        if name is not None:
            found.append(_Point(name, shape, node in path))
    return found


def _within_budget(points: list[_Point], slots: int, width: int) -> list[_Point]:
    """The points kept, as long as `slots` and `width` (channels) allow, in this order: the last block output
    of each spatial size (stage), deepest first; the activations inside the residual branches of the deepest
    size, whose own block output is seen only pooled, in the penultimate features; the other block outputs,
    deepest first. Returned in model order."""
    outputs = [i for i, p in enumerate(points) if p.on_path]
    ends = sorted({points[i].shape[2:]: i for i in outputs}.values(), reverse=True)
    deepest = points[-1].shape[2:] if points else None
    inner = [i for i in reversed(range(len(points))) if not points[i].on_path and points[i].shape[2:] == deepest]
    order = ends + inner + [i for i in reversed(outputs) if i not in ends]
    kept, used = [], 0
    for i in order:
        channels = points[i].shape[1]
        if len(kept) < slots and used + channels <= width:
            kept.append(i)
            used += channels
    return [points[i] for i in sorted(kept)]


def every_conv_and_dense(model: nn.Module) -> list[str]:
    """Names of every Conv2d and Linear module (their raw outputs), in registration order."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def stage_layers(model: nn.Module, *, budget: int = STAGE_BUDGET, max_width: int = WIDTH_BUDGET
                 ) -> tuple[list[str], str]:
    """Probe layers for the feature-space detectors of a model that declares none, and why: the block outputs
    of a traced dummy pass (values leaving a block after its activation or residual sum; the last of each
    stage first) and, for the deepest stage, whose output is seen only pooled, the activations inside its
    residual branches; at most `budget` layers of at most `max_width` channels together, the penultimate
    features (`penultimate_input`) included.
    A model that cannot be traced or run on a dummy input gets every Conv2d and Linear output, with a warning."""
    try:
        traced, shape = _dummy_pass(model)
    except ValueError as exc:
        layers = every_conv_and_dense(model)
        reason = (f"could not trace {type(model).__name__} ({exc}), so the feature-space detectors read every "
                  f"Conv2d and Linear output ({len(layers)} raw, pre-activation layers) instead of its stage "
                  "outputs: more memory and fit time, and usually less separation; give their `layers` setting")
        warnings.warn(reason, stacklevel=2)
        return layers, reason
    penultimate = penultimate_input(model)
    width = model.get_submodule(dense_layers(model)[-1]).in_features if penultimate else 0
    points = _block_points(model, traced.graph)
    chosen = _within_budget(points, budget - (penultimate is not None), max_width - width)
    layers = [p.layer for p in chosen] + ([penultimate] if penultimate else [])
    outputs = sum(p.on_path for p in chosen)
    reason = (f"a traced dummy pass of shape {shape} found {len(points)} values after an activation or a residual "
              f"sum; kept {outputs} block outputs and {len(chosen) - outputs} activations inside the deepest "
              f"residual branches, at {len({p.shape[2:] for p in chosen})} spatial sizes, within {budget} layers "
              f"and {max_width} channels" + (f", and the penultimate features {penultimate}" if penultimate else ""))
    return layers, reason
