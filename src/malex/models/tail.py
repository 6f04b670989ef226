"""The end of a forward pass, from its last convolution on, as a module of the values it reads.

Model mutation fuzzes dense layers and re-runs only what follows them. On a head of ONE dense layer that
measures little: the noise a fuzzed layer W' = W + N adds to a logit difference is proportional to the norm of
its input, so a label change says only how large the margin is against the feature norm, and trigger inputs
are no more robust than clean ones (digits TinyResNet, BadNets AUROC of mutation_bd 0.49 ± 0.13 over three
seeds). Fuzzing the last convolution instead restores the effect the test relies on (0.95 ± 0.03;
benchmarks/mutation_reach.py). `conv_tail` cuts a traced model just before its last convolution: the values
the rest of the pass reads (the convolution's input, and any skip connection that jumps over it) become the
inputs of a `torch.fx.GraphModule`, each captured by a probe layer, so the mutants re-run only the last
convolution, what follows it, and the head. `rest` is the same cut without the convolution: it takes the
convolution's output, so that noise can be added to that output directly (`malex.detectors.conv_noise`).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn.modules.conv import _ConvNd

from malex.models.anatomy import capture_name


@dataclass(frozen=True)
class Tail:
    """`module` maps the values that probe layers `inputs` capture (in that order) to the model's logits; it
    starts with the convolution `start`, whose input is `inputs[conv_input]`, and shares the model's submodules and
    parameter names. `rest(conv_output, *(inputs[i] for i in rest_inputs))` gives the same logits from the
    convolution's output."""

    module: fx.GraphModule
    inputs: tuple[str, ...]
    start: str
    reason: str
    rest: fx.GraphModule
    conv_input: int
    rest_inputs: tuple[int, ...]


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
    module, _ = _cut(model, nodes, at, list(crossing), with_start=True)
    rest, rest_inputs = _cut(model, nodes, at, list(crossing), with_start=False)
    start_name = str(start.target)
    return Tail(module, tuple(names), start_name,  # type: ignore[arg-type]
                f"the head is one dense layer, so the mutants fuzz the last convolution {start_name!r} instead and re-run "
                f"the model from it, on {', '.join(names)}",  # type: ignore[arg-type]
                rest, list(crossing).index(start.args[0]), rest_inputs)


def _cut(model: nn.Module, nodes: list[fx.Node], at: int, crossing: list[fx.Node],
         with_start: bool) -> tuple[fx.GraphModule, tuple[int, ...]]:
    """The graph from node `at` on, reading the `crossing` values as placeholders; without its first node (the
    convolution) it reads that node's output as its first placeholder instead, and keeps only the crossing values
    it still reads. Returns the module and the indices (into `crossing`) of the placeholders it kept."""
    sub = fx.Graph()
    start_out = None if with_start else sub.placeholder("conv_out")
    env: dict[fx.Node, fx.Node] = {n: sub.placeholder(f"in_{i}") for i, n in enumerate(crossing)}
    for node in nodes[:at]:
        if node.op == "get_attr":
            env[node] = sub.node_copy(node, lambda a: env[a])
    if start_out is not None:
        env[nodes[at]] = start_out
    for node in nodes[at if with_start else at + 1:]:
        if node.op == "output":
            sub.output(fx.map_arg(node.args[0], lambda a: env[a]))
            break
        env[node] = sub.node_copy(node, lambda a: env[a])
    module = fx.GraphModule(model, sub)
    module.graph.eliminate_dead_code()  # the get_attr copies the cut does not read
    kept = tuple(i for i, n in enumerate(crossing) if with_start or env[n].users)
    for i, n in enumerate(crossing):
        if i not in kept:
            module.graph.erase_node(env[n])
    module.recompile()
    return module, kept


#: functions that broadcast their tensor arguments elementwise: a value of every mutant meets a per-input value
#: without copying it once per mutant
_BROADCASTING = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
                 torch.div, torch.maximum, torch.minimum}
_ADD = {operator.add, torch.add}


@dataclass(frozen=True)
class Noisy:
    """Mutants' values of N inputs kept apart as `base` (N, C, ...) plus `noise` (M, N, C, ...) times a per-channel
    `scale` (C,) (None: 1): per-channel affine layers and sums with per-input values change only `base` and
    `scale`, so the M * N values are formed once, where the first other layer needs them."""

    base: torch.Tensor
    noise: torch.Tensor
    scale: torch.Tensor | None = None

    def values(self) -> torch.Tensor:
        """(M * N, C, ...): base + scale * noise, mutant-major."""
        base = self.base.unsqueeze(0)
        if self.scale is None:
            out = base + self.noise
        else:
            out = torch.addcmul(base, self.noise, self.scale.view(-1, *(1,) * (self.base.dim() - 2)))
        return out.flatten(0, 1)


def _batch_norm_scale(module: nn.Module) -> torch.Tensor | None:
    """The per-channel scale of a batch norm that uses its running statistics, else None."""
    if not isinstance(module, nn.modules.batchnorm._BatchNorm) or module.training or module.running_var is None:
        return None
    scale = torch.rsqrt(module.running_var + module.eps)
    return scale * module.weight if module.weight is not None else scale


class _MutantRun(fx.Interpreter):
    """Runs a cut whose first input is the mutants' values of N inputs (a `Noisy`) and whose other inputs hold one
    value per input (N rows): what does not depend on the first input runs once per input, and batch norms and sums
    with per-input values before the first other layer act on `Noisy.base` alone."""

    def __init__(self, module: fx.GraphModule, mutants: int) -> None:
        super().__init__(module)
        self.mutants = mutants
        self.modules = dict(module.named_modules())
        placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
        self.varies = {placeholders[0]}  # values of every mutant
        self.batched = set(placeholders)  # values with a row per input or per mutant (not constants)
        for node in module.graph.nodes:
            if any(arg in self.varies for arg in node.all_input_nodes):
                self.varies.add(node)
            if any(arg in self.batched for arg in node.all_input_nodes):
                self.batched.add(node)

    def run_node(self, n: fx.Node):  # noqa: ANN201 - whatever the node gives
        if n.op == "output":
            return fx.map_arg(n.args[0], lambda a: self.env[a].values() if isinstance(self.env[a], Noisy) else self.env[a])
        if n not in self.varies or n.op == "placeholder":
            return super().run_node(n)
        values = {a: self.env[a] for a in n.all_input_nodes}
        folded = self._fold(n, values)
        if folded is not None:
            return folded
        formed = [a for a, v in values.items() if isinstance(v, Noisy)]
        values = {a: v.values() if isinstance(v, Noisy) else v for a, v in values.items()}
        if len(formed) == 1 and n.args == (formed[0],) and n.kwargs in ({}, {"inplace": False}) and self._is_relu(n):
            return torch.relu_(values[formed[0]])  # the values were just formed for this node alone
        m = self.mutants
        fixed = [a for a in n.all_input_nodes if a not in self.varies and a in self.batched]  # one row per input
        if not fixed:
            args, kwargs = fx.map_arg((n.args, n.kwargs), lambda a: values[a])
            return getattr(self, n.op)(n.target, args, kwargs)
        if n.op == "call_function" and n.target in _BROADCASTING and not n.kwargs:
            def view(a: object) -> object:  # mutants' rows as (M, N, ...); per-input values broadcast over M
                if isinstance(a, fx.Node) and isinstance(values[a], torch.Tensor) and a in self.varies:
                    return values[a].unflatten(0, (m, -1))
                return values[a] if isinstance(a, fx.Node) else a
            return n.target(*(view(a) for a in n.args)).flatten(0, 1)

        def repeat(a: fx.Node) -> object:  # a per-input tensor copied once per mutant
            v = values[a]
            return v.unsqueeze(0).expand(m, *v.shape).flatten(0, 1) if isinstance(v, torch.Tensor) else v
        args, kwargs = fx.map_arg((n.args, n.kwargs), lambda a: repeat(a) if a in fixed else values[a])
        return getattr(self, n.op)(n.target, args, kwargs)

    def _is_relu(self, n: fx.Node) -> bool:
        return (n.op == "call_function" and n.target in (torch.relu, nn.functional.relu)
                or n.op == "call_module" and type(self.modules[str(n.target)]) is nn.ReLU)

    def _fold(self, n: fx.Node, values: dict[fx.Node, object]) -> Noisy | None:
        """`n` applied to a `Noisy` without forming its values (a batch norm on running statistics, or a sum with a
        per-input tensor or a number), else None."""
        if n.op == "call_module" and len(n.args) == 1 and not n.kwargs and isinstance(values.get(n.args[0]), Noisy):
            noisy: Noisy = values[n.args[0]]  # type: ignore[assignment]
            scale = _batch_norm_scale(self.modules[str(n.target)])
            if scale is None:
                return None
            return Noisy(self.modules[str(n.target)](noisy.base), noisy.noise,
                         scale if noisy.scale is None else scale * noisy.scale)
        if n.op == "call_function" and n.target in _ADD and len(n.args) == 2 and not n.kwargs:
            first, second = n.args
            noisy_arg, other_arg = (first, second) if isinstance(values.get(first), Noisy) else (second, first)
            noisy = values.get(noisy_arg)
            other = values[other_arg] if isinstance(other_arg, fx.Node) else other_arg
            per_input = (isinstance(other, (int, float)) or isinstance(other, torch.Tensor) and other_arg not in
                         self.varies and other.dim() == noisy.base.dim() and other.shape[0] == noisy.base.shape[0]) \
                if isinstance(noisy, Noisy) else False
            if per_input:
                return Noisy(noisy.base + other, noisy.noise, noisy.scale)
        return None


def run_mutants(rest: fx.GraphModule, mutants: int, first: Noisy, *others: torch.Tensor) -> torch.Tensor:
    """`rest(first, *others)` where `first` holds `mutants` values of each input (a `Noisy`) and `others` one value
    per input: the (M * N, ...) outputs of every mutant (mutant-major), with the per-input part computed once."""
    return _MutantRun(rest, mutants).run(first, *others)
