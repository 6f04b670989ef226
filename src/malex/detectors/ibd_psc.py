"""IBD-PSC (Hou et al., ICML 2024): parameter-oriented scaling consistency.

L. Hou, R. Feng, Z. Hua, W. Luo, L. Y. Zhang, Y. Li. "IBD-PSC: Input-level Backdoor Detection via
Parameter-oriented Scaling Consistency", ICML 2024 (arXiv 2405.09786).

The paper multiplies the parameters (weight and bias) of the last BatchNorm layers by a factor (1.5)
and observes that backdoor inputs keep a high confidence in their original label under the amplified
models, while benign inputs lose it. For each input x with original label c = f(x), the score is

    PSC(x) = (1 / n) * sum over the amplified models m of softmax(f_m(x))[c],

higher meaning more suspicious. The amplified models are built by adaptive layer selection: with the
layers ordered from the output back, let k be the smallest number of last layers whose amplification
pushes the error rate on clean data above xi (0.6); the n models then amplify the last k, k + 1, ...,
k + n - 1 layers ("starting from the k-th layer, progressively amplify more layers").

Generalisation to networks without BatchNorm (malex's architectures have none). A BatchNorm layer is a
per-channel affine map y = gamma * x_hat + beta that follows a convolution or dense layer; multiplying
(gamma, beta) by s multiplies that whole affine stage by s. Folding the BN into the layer before it
(W' = gamma W / sigma, b' = gamma (b - mu) / sigma + beta) shows that this is exactly multiplying the
folded layer's weight AND bias by s. So a model that has affine BatchNorm layers gets the paper's method
as is (only its BN layers are amplified); a model without gets its Conv and Linear layers amplified
instead, each counted as one layer, all its parameters multiplied by `amplify`. Layers are ordered by
their first call in a forward pass (recorded with hooks at fit time), not by registration order.

Notes on the generalisation:
- In a plain ReLU network without normalisation, amplifying only the very last dense layer scales the
  logits (a softmax temperature): labels stay, confidences sharpen. Deeper amplification changes labels
  only through the relative shrinking of the biases, so the clean error may never exceed xi (the
  paper's rule is then undefined). Then the start is the number of layers with the largest clean error
  (ties: the fewest layers), `selection_` records "fallback" instead of "adaptive", and PSC amounts to
  the model's confidence at a sharpened softmax temperature. `start` in the config fixes it by hand.
- A model with fewer than k + n - 1 amplifiable layers gives fewer than n amplified models.
- The authors' BackdoorBox code lets its first model amplify k + 1 layers (one past the threshold);
  this module follows the paper's text and starts at k.
- The clean error is measured against the labels `y` given to `fit`, or, when none are given, against
  the original model's own predictions (the disagreement rate).

The amplified parameters are built once (at fit, and deterministically from the model's weights at
restore; only the amplified tensors, one copy each, shared by all models) and every amplified model is
evaluated with `torch.func.functional_call`: the guarded model is never modified or copied.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from malex.detectors.base import BACKDOOR, Detector
from malex.device import model_device
from malex.errors import ConfigError
from malex.models.inference import eval_mode
from malex.probe import Observation

#: layers the paper amplifies, and the layers amplified in their place in a model without them
BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
AFFINE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class IBDPSCConfig:
    """Amplification factor, number of amplified models, the clean-error threshold xi for the start layer.

    `start` fixes the number of last layers the first model amplifies (skips the adaptive selection).
    """

    amplify: float = 1.5
    n_models: int = 5
    xi: float = 0.6
    start: int | None = None
    batch_size: int = 512

    def __post_init__(self) -> None:
        if not (np.isfinite(self.amplify) and self.amplify > 1.0):
            raise ConfigError(f"IBD-PSC amplify is {self.amplify}; expected a finite factor > 1")
        if self.n_models < 1 or not 0.0 < self.xi < 1.0 or self.batch_size < 1:
            raise ConfigError(
                f"invalid IBD-PSC settings {self}; expected n_models >= 1, xi in (0, 1) and batch_size >= 1"
            )
        if self.start is not None and self.start < 1:
            raise ConfigError(f"IBD-PSC start is {self.start}; expected None (adaptive) or >= 1")


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def amplifiable_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the layers to amplify, from the output back (by first call on `example`).

    The affine BatchNorm layers when the model has any (the paper), else the Conv and Linear layers.
    """
    modules = [(n, m) for n, m in model.named_modules() if _has_params(m)]
    kinds = BATCHNORM if any(isinstance(m, BATCHNORM) for _, m in modules) else AFFINE
    order: list[str] = []
    handles = []
    for name, module in modules:
        if isinstance(module, kinds):

            def hook(_m, _args, _out, _name=name):
                if _name not in order:
                    order.append(_name)

            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad(), eval_mode(model):
            model(example.to(model_device(model)))
    finally:
        for h in handles:
            h.remove()
    return order[::-1]


class IBDPSC(Detector):
    """IBD-PSC on parametrised layers (see the module docstring for the BatchNorm-free generalisation)."""

    name = "ibd_psc"
    config_class = IBDPSCConfig
    evidence = BACKDOOR
    config: IBDPSCConfig
    fitted_attributes = ("layers_", "start_", "layer_counts_", "clean_error_", "selection_")

    def __init__(self, model: nn.Module, config: IBDPSCConfig | None = None) -> None:
        super().__init__(model, config)
        self._scaled: dict[str, dict[str, torch.Tensor]] | None = None

    # --- amplified parameters -------------------------------------------------------------------------

    def _build_scaled(self) -> None:
        """One amplified copy of each layer's parameters (detached; the model's own tensors untouched)."""
        modules = dict(self.model.named_modules())
        missing = [n for n in self.layers_ if n not in modules]
        if missing:
            raise ConfigError(f"IBD-PSC was fitted on layers the model lacks: {', '.join(missing)}")
        s = self.config.amplify
        self._scaled = {
            name: {f"{name}.{p}": t.detach() * s for p, t in modules[name].named_parameters(recurse=False)}
            for name in self.layers_
        }

    def _params(self, count: int) -> dict[str, torch.Tensor]:
        """Parameters that replace the model's own in the model amplifying the last `count` layers."""
        if self._scaled is None:
            self._build_scaled()
        assert self._scaled is not None
        out: dict[str, torch.Tensor] = {}
        for name in self.layers_[:count]:
            out.update(self._scaled[name])
        return out

    @torch.no_grad()
    def _amplified_logits(self, x: torch.Tensor, count: int) -> torch.Tensor:
        """Logits (CPU, float32) of the model with its last `count` layers amplified, in batches."""
        device = model_device(self.model)
        params = self._params(count)
        outs = []
        with eval_mode(self.model):
            for start in range(0, x.shape[0], self.config.batch_size):
                xb = x[start : start + self.config.batch_size].to(device)
                outs.append(functional_call(self.model, params, (xb,)).float().cpu())
        return torch.cat(outs) if outs else torch.empty(0)

    # --- contract ---------------------------------------------------------------------------------------

    def fit(self, clean: Observation, y: torch.Tensor | None = None) -> "IBDPSC":
        """Order the layers, select the start by the clean error under amplification, fix the models."""
        if len(clean) < 1:
            raise ConfigError("IBD-PSC needs clean inputs to fit; got none")
        reference = clean.pred if y is None else torch.as_tensor(y).long().cpu()
        if reference.shape[0] != len(clean):
            raise ConfigError(f"{reference.shape[0]} labels for {len(clean)} clean inputs")
        self.layers_ = amplifiable_layers(self.model, clean.x[:1])
        n_layers = len(self.layers_)
        if n_layers == 0:
            raise ConfigError("IBD-PSC found no BatchNorm, Conv or Linear layer with parameters to amplify")
        self._build_scaled()
        errors = [float((self._amplified_logits(clean.x, k).argmax(dim=1) != reference).float().mean())
                  for k in range(1, n_layers + 1)]
        if self.config.start is not None:
            if self.config.start > n_layers:
                raise ConfigError(
                    f"IBD-PSC start is {self.config.start}; the model has {n_layers} amplifiable layers"
                )
            start, selection = self.config.start, "fixed"
        else:
            above = [k for k, e in enumerate(errors, start=1) if e > self.config.xi]
            start, selection = (above[0], "adaptive") if above else (int(np.argmax(errors)) + 1, "fallback")
        self.selection_ = selection
        self.clean_error_ = errors
        self.start_ = int(start)
        self.layer_counts_ = list(range(start, min(start + self.config.n_models, n_layers + 1)))
        return self

    def _after_restore(self) -> None:
        self.layers_ = [str(n) for n in self.layers_]
        self.layer_counts_ = [int(k) for k in self.layer_counts_]
        self._scaled = None
        self._build_scaled()

    def psc(self, obs: Observation) -> np.ndarray:
        """Mean over the amplified models of the probability of the original label; one float64 per input."""
        self.check_fitted()
        if len(obs) == 0:
            return np.zeros(0)
        label = obs.pred.view(-1, 1)
        total = torch.zeros(len(obs), dtype=torch.float64)
        for count in self.layer_counts_:
            prob = torch.softmax(self._amplified_logits(obs.x, count).double(), dim=1)
            total += prob.gather(1, label).squeeze(1)
        return (total / len(self.layer_counts_)).numpy()

    def score(self, obs: Observation) -> np.ndarray:
        """PSC: higher means more suspicious."""
        return self.psc(obs)

    def state(self) -> dict:
        out: dict = {"config": asdict(self.config)}
        if self.is_fitted:
            out.update(selection=self.selection_, start=self.start_, layer_counts=list(self.layer_counts_),
                       layers=list(self.layers_), clean_error=list(self.clean_error_))
        return out
