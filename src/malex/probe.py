"""The one forward pass: hooks capture named layers so that every detector reads the same pass.

A layer is named as in `model.named_modules()`. By default the module's output is captured; a name
ending in ":in" captures the module's input instead (model mutation re-runs the dense head on its cached
input). Hooks live only for the duration of a pass; the model is never changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

from malex.device import model_device
from malex.errors import ConfigError
from malex.models.anatomy import INPUT_SUFFIX, penultimate_input, stage_layers
from malex.models.inference import eval_mode
from malex.progress import track



@dataclass
class Observation:
    """What one probe pass saw: the inputs, the logits, and the captured layers (all on the CPU)."""

    x: torch.Tensor
    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def pred(self) -> torch.Tensor:
        """The model's predicted labels."""
        return self.logits.argmax(dim=1)

    def layer(self, name: str) -> torch.Tensor:
        """The captured tensor for `name`, with a clear error when it was not captured."""
        if name not in self.features:
            raise ConfigError(f"layer {name!r} was not captured by the probe; captured: {', '.join(self.features)}")
        return self.features[name]

    def subset(self, index: torch.Tensor | slice) -> "Observation":
        """The observation restricted to the inputs at `index`."""
        return Observation(self.x[index], self.logits[index], {k: v[index] for k, v in self.features.items()})

    @staticmethod
    def concat(parts: Sequence["Observation"]) -> "Observation":
        """Join observations of consecutive batches."""
        keys = parts[0].features.keys()
        return Observation(
            torch.cat([p.x for p in parts]),
            torch.cat([p.logits for p in parts]),
            {k: torch.cat([p.features[k] for p in parts]) for k in keys},
        )


def default_layers(model: nn.Module) -> list[str]:
    """The model's own `probe_layers` when it declares them, else its stage outputs and penultimate features
    (`malex.models.anatomy.stage_layers`; every Conv2d and Linear output, with a warning, when it cannot be
    traced)."""
    return chosen_layers(model)[0]


def chosen_layers(model: nn.Module) -> tuple[list[str], str]:
    """`default_layers` and why they were chosen (for `malex info`)."""
    declared = getattr(model, "probe_layers", None)
    if declared:
        return list(declared), f"declared by the model ({type(model).__name__}.probe_layers)"
    return stage_layers(model)


def penultimate_layer(model: nn.Module) -> str:
    """The last hidden layer: among a malex model's declared probe layers, the one before the logits layer; for
    a model that declares none, the features its last dense layer reads (its input: e.g. the pooled features of
    a global-pool head, past the last block's normalisation, skip connection and activation)."""
    if not getattr(model, "probe_layers", None) and (features := penultimate_input(model)) is not None:
        return features
    layers = default_layers(model)
    if not layers:
        raise ConfigError("the model declares no probe layers and has no Conv2d/Linear modules")
    return layers[-2] if len(layers) >= 2 else layers[-1]


class Probe:
    """Run a model once over a batch and capture the requested layers."""

    def __init__(self, model: nn.Module, layers: Iterable[str] | None = None) -> None:
        self.model = model
        self.layers = list(dict.fromkeys(default_layers(model) if layers is None else layers))
        modules = dict(model.named_modules())
        for name in self.layers:
            base = name[: -len(INPUT_SUFFIX)] if name.endswith(INPUT_SUFFIX) else name
            if base not in modules:
                raise ConfigError(f"model has no layer {base!r}; layers: {', '.join(n for n in modules if n)}")
        self._modules = modules

    def _install(self, store: dict[str, torch.Tensor], keep_graph: bool = False
                 ) -> list[torch.utils.hooks.RemovableHandle]:
        handles = []

        def kept(t: torch.Tensor) -> torch.Tensor:
            return t if keep_graph else t.detach()

        for name in self.layers:
            if name.endswith(INPUT_SUFFIX):
                module = self._modules[name[: -len(INPUT_SUFFIX)]]

                def pre_hook(_m, args, _name=name):
                    store[_name] = kept(args[0])

                handles.append(module.register_forward_pre_hook(pre_hook))
            else:

                def hook(_m, _args, output, _name=name):
                    store[_name] = kept(output)

                handles.append(self._modules[name].register_forward_hook(hook))
        return handles

    @torch.no_grad()
    def run(self, x: torch.Tensor, batch_size: int = 256, progress: bool = False) -> Observation:
        """One pass over `x` (float32 NCHW in [0, 1]) in batches; returns an `Observation`."""
        device = model_device(self.model)
        parts: list[Observation] = []
        store: dict[str, torch.Tensor] = {}
        handles = self._install(store)
        try:
            with eval_mode(self.model):
                starts = range(0, x.shape[0], batch_size)
                for start in track(starts, "probe (batches)", enabled=progress):
                    xb = x[start : start + batch_size]
                    logits = self.model(xb.to(device)).float().cpu()
                    feats = {k: store[k].float().cpu() for k in self.layers}
                    parts.append(Observation(xb.cpu(), logits, feats))
                    store.clear()
        finally:
            for h in handles:
                h.remove()
        return Observation.concat(parts)


def trace(model: nn.Module, x: torch.Tensor, layers: Iterable[str]) -> Observation:
    """One pass over the batch `x` (on the model's device) that keeps autograd's graph: the logits and the
    captured `layers` are differentiable with respect to `x` (for attacks that differentiate a detector's score).
    Every module is in eval mode for the pass and gets its own flag back; nothing is moved to the CPU."""
    probe = Probe(model, layers)
    store: dict[str, torch.Tensor] = {}
    handles = probe._install(store, keep_graph=True)
    try:
        with eval_mode(model):
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return Observation(x, logits, {k: store[k] for k in probe.layers})


def observe(model: nn.Module, x: torch.Tensor, layers: Iterable[str] | None = None, batch_size: int = 256) -> Observation:
    """Shorthand: `Probe(model, layers).run(x)`."""
    return Probe(model, layers).run(x, batch_size=batch_size)
