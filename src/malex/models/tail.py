"""The end of a forward pass, from its last convolution on, as a module of the values it reads.

Model mutation fuzzes dense layers and re-runs only what follows them. On a head of ONE dense layer that
measures little: the noise a fuzzed layer W' = W + N adds to a logit difference is proportional to the norm of
its input, so a label change says only how large the margin is against the feature norm, and trigger inputs
are no more robust than clean ones (digits TinyResNet, BadNets AUROC of mutation_bd 0.49 ± 0.13 over three
seeds). Fuzzing the last convolution instead restores the effect the test relies on (0.95 ± 0.03;
benchmarks/mutation_reach.py). `conv_tail` cuts a traced model just before its last convolution: the values
the rest of the pass reads (the convolution's input, and any skip connection that jumps over it) become the
inputs of a `torch.fx.GraphModule`, each captured by a probe layer, so the mutants re-run only the last
convolution, what follows it, and the head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn.modules.conv import _ConvNd

from malex.models.anatomy import capture_name


@dataclass(frozen=True)
class Tail:
    """`module` maps the values that probe layers `inputs` capture (in that order) to the model's logits; it
    starts with the convolution `start` and shares the model's submodules and parameter names."""

    module: fx.GraphModule
    inputs: tuple[str, ...]
    start: str
    reason: str


def conv_tail(model: nn.Module) -> Tail | None:
    """The model from its last convolution on (see the module's docstring); None when the model cannot be traced
    by torch.fx, has no convolution that every dense layer follows, calls that convolution more than once, or
    reads a value in the tail that no probe layer can capture (one that only functions read)."""
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception:  # data-dependent control flow, unsupported ops: fx raises many kinds of errors
        return None
    modules = dict(model.named_modules())
    nodes = list(graph.nodes)
    calls = [n for n in nodes if n.op == "call_module"]
    convs = [n for n in calls if isinstance(modules[str(n.target)], _ConvNd)]
    if not convs:
        return None
    start = convs[-1]
    at = nodes.index(start)
    dense_before = any(isinstance(modules[str(n.target)], nn.Linear) for n in calls if nodes.index(n) < at)
    if dense_before or sum(str(n.target) == str(start.target) for n in calls) != 1:
        return None
    tail_nodes = [n for n in nodes[at:] if n.op != "output"]
    inside = set(tail_nodes)
    crossing: dict[fx.Node, None] = {}
    for node in tail_nodes:
        for arg in node.all_input_nodes:
            if arg not in inside and arg.op != "get_attr":
                crossing[arg] = None
    last_call = {str(n.target): n for n in calls}
    names = [capture_name(n, last_call) if n.op != "placeholder" else None for n in crossing]
    if any(name is None for name in names):
        return None
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {n: sub.placeholder(f"in_{i}") for i, n in enumerate(crossing)}
    for node in nodes[:at]:
        if node.op == "get_attr":
            env[node] = sub.node_copy(node, lambda a: env[a])
    for node in tail_nodes:
        env[node] = sub.node_copy(node, lambda a: env[a])
    output = next(n for n in nodes if n.op == "output")
    sub.output(fx.map_arg(output.args[0], lambda a: env[a]))
    module = fx.GraphModule(model, sub)
    module.graph.eliminate_dead_code()  # the get_attr copies the tail does not read
    module.recompile()
    start_name = str(start.target)
    return Tail(module, tuple(names), start_name,  # type: ignore[arg-type]
                f"the head is one dense layer, so the mutants fuzz the last convolution {start_name!r} instead and re-run "
                f"the model from it, on {', '.join(names)}")  # type: ignore[arg-type]
