"""A saved program (a `torch.export` `.pt2` or a TorchScript file) as a module malex can probe and mutate.

The probe hooks layers by name, the detectors find the dense head by `nn.Linear` modules and evaluate mutants
with `torch.func.functional_call`. Neither a loaded TorchScript module (no hooks, no stateless calls) nor
`torch.export.unflatten`'s `InterpreterModule`s (not `nn.Linear` / `nn.Conv2d`) allow all three. So the
program becomes one flat `torch.fx.GraphModule` (TorchScript through `torch._export.converter`), whose weights
keep their names (`head.weight`), and every dense and 2-D convolution call becomes a real `nn.Linear` /
`nn.Conv2d` module at its weights' path (`head`), called from the graph: hooks, head finding and functional
calls then work as on the model the program was made from.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import fx, nn

from malex.errors import ModelFileError

_LINEAR = torch.ops.aten.linear.default
_CONV2D = torch.ops.aten.conv2d.default


def _owner_and_attr(node: fx.Node | None, suffix: str) -> str | None:
    """The module path of a `get_attr` node reading `PATH.suffix`, else None."""
    if isinstance(node, fx.Node) and node.op == "get_attr" and str(node.target).endswith("." + suffix):
        return str(node.target)[: -len(suffix) - 1]
    return None


def _layer(gm: fx.GraphModule, node: fx.Node) -> tuple[str, nn.Module] | None:
    """The real layer a linear / conv2d call node stands for, and its path; None when the call does not read
    its weight and bias from one module path that holds nothing else."""
    args = list(node.args) + [None] * 7
    weight_node, bias_node = args[1], args[2]
    path = _owner_and_attr(weight_node, "weight")
    if path is None or not (bias_node is None or _owner_and_attr(bias_node, "bias") == path):
        return None
    owner = gm.get_submodule(path)
    if list(owner.children()) or (set(owner._parameters) | set(owner._buffers)) - {"weight", "bias"}:
        return None  # the path holds more than one layer's weights: leave the call as it is
    weight, bias = owner.weight, None if bias_node is None else owner.bias
    if node.target is _LINEAR:
        layer: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    else:
        stride, padding, dilation, groups = (args[3] or 1, args[4] or 0, args[5] or 1, args[6] or 1)
        if isinstance(padding, str):
            return None
        layer = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=stride,
                          padding=padding, dilation=dilation, groups=groups, bias=bias is not None)
    with torch.no_grad():
        layer.weight = nn.Parameter(weight.detach().clone())
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone())
    return path, layer


def with_layers(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` with each `aten.linear` / `aten.conv2d` call that reads one module path's weight (and bias) turned
    into a call of a real `nn.Linear` / `nn.Conv2d` at that path (each path used once)."""
    done: set[str] = set()
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (_LINEAR, _CONV2D):
            continue
        found = _layer(gm, node)
        if found is None or found[0] in done:
            continue
        path, layer = found
        done.add(path)
        parent, _, name = path.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, layer)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(path, (node.args[0],))
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    return fx.GraphModule(gm, gm.graph)  # a plain GraphModule: the exported one refuses train() and eval()


def _batch_is_dynamic(program: torch.export.ExportedProgram) -> bool:
    inputs = [n for n in program.graph.nodes if n.op == "placeholder"
              and n.name in program.graph_signature.user_inputs]
    return all(isinstance(n.meta["val"].shape[0], torch.SymInt) for n in inputs if "val" in n.meta)


def program_module(program: torch.export.ExportedProgram, path: Path) -> fx.GraphModule:
    """An exported program as a flat module with real layers (`with_layers`); refused when its batch size is
    fixed (the guard screens batches of any size)."""
    inputs = program.graph_signature.user_inputs
    if len(inputs) != 1:
        raise ModelFileError(f"{path}: the program takes {len(inputs)} inputs; expected one image batch")
    if not _batch_is_dynamic(program):
        raise ModelFileError(f"{path}: the program was exported for one batch size; re-export it with a dynamic "
                             "batch, e.g. torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("
                             "'batch')},))")
    return with_layers(program.module())


def load_export(path: Path) -> fx.GraphModule:
    """A `torch.export.save` file (.pt2) as a module (`program_module`)."""
    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # torch.export.load raises many types for a damaged or foreign archive
        raise ModelFileError(f"{path}: not a readable torch.export program ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:200]})") from exc
    return program_module(program, path)


def load_torchscript(path: Path, input_shape: tuple[int, int, int] | None) -> fx.GraphModule:
    """A `torch.jit.save` file as a module: converted to an exported program on a sample batch of
    `input_shape` (needed: TorchScript records no input shape), then `program_module`."""
    from torch._export.converter import TS2EPConverter

    if input_shape is None:
        raise ModelFileError(f"{path}: a TorchScript model records no input shape; give --input-shape C,H,W")
    try:
        scripted = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as exc:
        raise ModelFileError(f"{path}: not a readable TorchScript file ({' '.join(str(exc).split())[:200]})") from exc
    scripted.eval()
    try:
        program = TS2EPConverter(scripted, (torch.zeros((2, *input_shape)),)).convert()
    except Exception as exc:  # the converter raises many types for graphs it cannot express
        raise ModelFileError(f"{path}: the TorchScript model could not be converted for probing "
                             f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from exc
    return program_module(program, path)
