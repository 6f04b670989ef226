"""Model mutation testing (Wang et al., ICSE 2019), made two-sided as in Jin et al.

Mutants are Gaussian fuzzings of the dense layers' weights, W' = W + N(mean(W), (max(W) * r)^2), drawn
from a seed so that mutant i is the same in every call and after a save and load. The guarded model is
never touched: mutants are parameter sets passed to `torch.func.functional_call`, and when every dense
layer sits in the model's `head`, only the head is re-run, on its cached input from the probe pass, with
many mutants at once through `vmap`. On a head of ONE dense layer, fuzzing it measures only the margin
against the feature norm, so the backdoor side (`through_last_conv`) fuzzes the model's last convolution
instead and re-runs the model from it (`malex.models.tail`); where that convolution is a 2-D one with more values
per patch than output positions, the test draws each input's output noise directly rather than running mutated
convolutions (`malex.detectors.conv_noise`: the same label-change law per input, at a fraction of the cost).

The label-change rate (LCR) of an input is the share of mutants whose label differs from the guarded
model's own prediction. Adversarial examples sit near a boundary, so their LCR is high at a mild
strength (r about 0.3); backdoor inputs are more robust than clean ones, so their LCR is LOW at a strong
strength (r about 0.65). The LCR threshold is calibrated on clean data; a sequential probability ratio
test stops each input as soon as the evidence suffices.

The right strength depends on the model (max(W) of a wide layer says little about its typical weight),
so the strength can also be calibrated: with `target_clean_lcr` set, `fit` searches the r at which the
mean clean LCR reaches that target.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from malex.detectors.base import ADVERSARIAL, BACKDOOR, Detector
from malex.detectors.conv_noise import ConvOutputNoise
from malex.detectors.sprt import SPRT
from malex.errors import ConfigError, ModelFileError
from malex.models.anatomy import dense_layers, find_head, head_reproduces
from malex.models.inference import eval_mode
from malex.models.tail import Noisy, Tail, conv_tail, run_mutants
from malex.probe import Observation
from malex.progress import counter


#: most values a batch of mutants' inputs may hold (float32: 128 MiB per intermediate activation)
MUTANT_ELEMENTS = 2**25
#: the same for sampled convolution noise: smaller batches whose intermediates stay in reused memory (ResNetGAP on
#: CIFAR-10, 10 mutants of 256 inputs: 0.14-0.18x of a forward pass at 2**25 values, 0.06x at 2**23 and 2**21)
SAMPLED_ELEMENTS = 2**23
#: most values the per-input noise factors and outputs of the last convolution may hold at once (see `_blocks`)
PREPARED_ELEMENTS = 2**26
#: with `light_tail_fit`, where the mutants re-run the tail from the last convolution: inputs and mutants per step of
#: the strength search, and inputs the LCR threshold is set on
TAIL_SEARCH_INPUTS, TAIL_SEARCH_MUTANTS, TAIL_THRESHOLD_INPUTS = 128, 20, 512


@dataclass(frozen=True)
class MutationConfig:
    """Settings of the mutation test. `suspicious` says which tail of the LCR is flagged."""

    strength: float = 0.3
    target_clean_lcr: float | None = None
    suspicious: Literal["high", "low"] = "high"
    max_mutants: int = 100
    alpha: float = 0.05
    beta: float = 0.05
    indifference: float = 0.05
    #: share of clean inputs whose LCR lies beyond the SPRT's LCR threshold (the quantile that sets it; not the
    #: guard's false-positive rate, which is calibrated on the detector's scores)
    lcr_tail: float = 0.05
    chunk: int = 10
    sequential: bool = True
    seed: int = 0
    batch_size: int = 2048
    cache_mb: float = 256.0  # memory for drawn mutants, kept between calls (0: draw them at every call)
    #: where the dense head is ONE dense layer, fuzz the last convolution instead and re-run the model from it
    #: (`malex.models.tail`): fuzzing one dense layer measures only margin over feature norm
    through_last_conv: bool = False
    #: where the mutants re-run the tail from the last convolution (64 times a dense head's work per mutant on a
    #: 32x32 ResNet even with sampled noise), search the strength on 128 inputs x 20 mutants per step and set the
    #: LCR threshold on 512 inputs instead of 256 x max_mutants and all: the threshold only places the sequential
    #: test, and the guard calibrates the detector's scores on its own clean split
    light_tail_fit: bool = True
    progress: bool = False

    def __post_init__(self) -> None:
        if (self.strength <= 0 or self.max_mutants < 1 or self.chunk < 1 or self.batch_size < 1
                or not self.cache_mb >= 0):
            raise ConfigError(f"invalid mutation settings {self}; expected strength > 0, counts >= 1, "
                              "cache_mb >= 0")
        if self.suspicious not in ("high", "low"):
            raise ConfigError(f"suspicious is {self.suspicious!r}; expected 'high' or 'low'")
        if self.target_clean_lcr is not None and not 0 < self.target_clean_lcr < 1:
            raise ConfigError(f"target_clean_lcr is {self.target_clean_lcr}; expected a value in (0, 1)")
        if not 0 < self.indifference < 0.5 or not 0 < self.lcr_tail < 0.5:
            raise ConfigError(f"indifference {self.indifference} and lcr_tail {self.lcr_tail} must lie in (0, 0.5)")


@dataclass(frozen=True)
class MutationTest:
    """Per input: LCR over the mutants used, how many were used, and the SPRT decision (+1/-1/0)."""

    lcr: np.ndarray
    n_mutants: np.ndarray
    decision: np.ndarray


@dataclass(frozen=True)
class MutationTarget:
    """What the mutants re-run: `module` maps the values that probe layers `inputs` capture (none: the raw input)
    to the logits, and its parameters `weights` are the ones fuzzed. `reach` says which part of the model that is:
    "head" (the dense head), "last_conv" (from the last convolution on, see `malex.models.tail`) or "model"."""

    module: nn.Module
    inputs: tuple[str, ...]
    weights: tuple[str, ...]
    reach: Literal["head", "last_conv", "model"]
    reason: str
    tail: Tail | None = None  # with reach "last_conv"

    def whole_model(self, model: nn.Module) -> "MutationTarget":
        """The same weights fuzzed, in the whole model re-run from the raw input (named as the model names them)."""
        weights = _dense_weights(model) if self.reach == "head" else self.weights
        return MutationTarget(model, (), weights, "model", f"re-running {self.reach} on its captured input does not "
                              "give the model's labels, so every mutant re-runs the whole model")


def _dense_weights(module: nn.Module) -> tuple[str, ...]:
    return tuple(f"{n}.weight" if n else "weight" for n, m in module.named_modules() if isinstance(m, nn.Linear))


def mutation_target(model: nn.Module, through_last_conv: bool = False) -> MutationTarget:
    """The part of `model` the mutants replace. When a submodule holds every dense layer (`model.head`, a foreign
    model's `fc` or `classifier`: see `malex.models.anatomy.find_head`), only it is re-run; when that head is one
    dense layer and `through_last_conv` is set, the mutants fuzz the last convolution instead and re-run the model
    from it (`malex.models.tail.conv_tail`). `fit` checks on data that the part reproduces the model's labels."""
    if not dense_layers(model):
        raise ConfigError("the model has no dense (nn.Linear) layers to mutate")
    head = find_head(model)
    if head is None:
        return MutationTarget(model, (), _dense_weights(model), "model", "no submodule holds every dense layer")
    if through_last_conv and len(dense_layers(head.module)) == 1:  # e.g. fc, or Sequential(Dropout, Linear)
        tail = conv_tail(model)
        if tail is not None:
            sampled = ("; the test samples each input's output noise of the fuzzed convolution instead of running it "
                       "(where a patch holds more values than the output has positions)"
                       if ConvOutputNoise.supports(model.get_submodule(tail.start)) else "")
            return MutationTarget(tail.module, tail.inputs, (f"{tail.start}.weight",), "last_conv", tail.reason + sampled,
                                  tail)
    return MutationTarget(head.module, (head.input_layer,), _dense_weights(head.module), "head", head.reason)


def _spread(obs: Observation, k: int) -> Observation:
    """At most `k` of the inputs, evenly spaced (not the first k: a fit set may be ordered by class)."""
    n = len(obs)
    return obs if n <= k else obs.subset(torch.linspace(0, n - 1, k).round().long())


def stackable_head(module: nn.Module) -> bool:
    """Is `module` a sequence of layers whose mutants `ModelMutation` can run as batched matrix products
    (in eval mode): a single dense layer, or flatten/identity/dropout, then only dense, ReLU, dropout and
    identity layers?"""
    if isinstance(module, nn.Linear):
        return True
    if not isinstance(module, nn.Sequential):
        return False
    children = list(module.children())
    first = next((i for i, c in enumerate(children) if isinstance(c, nn.Linear)), None)
    return first is not None and all(
        isinstance(c, (nn.Linear, nn.ReLU, nn.Dropout, nn.Identity)) for c in children[first:]
    ) and all(isinstance(c, (nn.Flatten, nn.Identity, nn.Dropout)) for c in children[:first])


class GaussianFuzzer:
    """Deterministic Gaussian-fuzzed copies of weights (a module's parameters by name), as stacked parameters.

    Drawing the noise costs more than running the mutants on cached head inputs, so drawn mutants are
    kept, up to `cache_bytes` (beyond that they are drawn again at every call; the values are the same
    either way)."""

    def __init__(self, weights: dict[str, torch.Tensor], strength: float, seed: int, cache_bytes: int = 0) -> None:
        self.strength = strength
        self.seed = seed
        self.weights = {k: w.detach() for k, w in weights.items()}
        self.stats = {k: (float(w.mean()), float(w.max()) * strength) for k, w in self.weights.items()}
        self.bytes_per_mutant = sum(w.numel() * w.element_size() for w in self.weights.values())
        self._room = max(cache_bytes, 0) // max(self.bytes_per_mutant, 1)  # mutants the cache may still take
        self._cache: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    def _draw(self, ids: range) -> dict[str, torch.Tensor]:
        stacked: dict[str, list[torch.Tensor]] = {k: [] for k in self.weights}
        for i in ids:
            gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + i)
            for k, w in self.weights.items():
                mean, std = self.stats[k]
                noise = torch.randn(w.shape, generator=gen) * std + mean
                stacked[k].append(w + noise.to(w.device))
        return {k: torch.stack(v) for k, v in stacked.items()}

    def mutants(self, ids: range) -> dict[str, torch.Tensor]:
        """Parameters of mutants `ids`, each stacked along a new first dimension (do not modify them)."""
        key = (ids.start, ids.stop)
        if ids.step == 1 and key in self._cache:
            return self._cache[key]
        params = self._draw(ids)
        if ids.step == 1 and len(ids) <= self._room:
            self._cache[key] = params
            self._room -= len(ids)
        return params


class ModelMutation(Detector):
    """Two-sided model-mutation detector scored by the label-change rate under Gaussian fuzzing.

    This generic form takes any `MutationConfig` and types no evidence; the registry holds the study's
    two sides as subclasses with their own defaults (`AdversarialMutation`, `BackdoorMutation`,
    `FixedBackdoorMutation`)."""

    name = "mutation"
    config_class = MutationConfig
    evidence = None
    config: MutationConfig
    fitted_attributes = ("lcr_threshold_",)

    def __init__(self, model: nn.Module, config: MutationConfig | None = None) -> None:
        super().__init__(model, config)
        self._set_target(mutation_target(model, self.config.through_last_conv))
        self.fuzzer = self._fuzzer(self.config.strength)

    def _set_target(self, target: MutationTarget) -> None:
        self.target = target
        # a plain dense head runs as batched matrix products; a tail from a 2-D convolution as sampled output noise
        # (`conv_noise`); anything else through vmap over functional_call
        self._stackable = target.reach == "head" and stackable_head(target.module)
        conv = target.module.get_submodule(target.tail.start) if target.tail is not None else None
        self._noise = ConvOutputNoise(conv, self.config.seed) if ConvOutputNoise.supports(conv) else None

    @property
    def module(self) -> nn.Module:
        """The module the mutants re-run (see `MutationTarget`)."""
        return self.target.module

    def inputs_of(self, obs: Observation) -> tuple[torch.Tensor, ...]:
        """What the mutated module takes, from a probe pass: its captured inputs, or the raw input."""
        return tuple(obs.layer(n) for n in self.target.inputs) if self.target.inputs else (obs.x,)

    def _check_target(self, clean: Observation) -> None:
        """Fall back to re-running the whole model (with a warning) when re-running the mutated part on its
        captured inputs does not give the model's own labels of the clean inputs."""
        if self.target.reach == "model" or head_reproduces(self.module, self.inputs_of(clean), clean.pred):
            return
        self._set_target(self.target.whole_model(self.model))
        warnings.warn(f"{self.name}: {self.target.reason} (about {self.config.max_mutants} forward passes per input "
                      "at most)", stacklevel=3)
        self.fuzzer = self._fuzzer(self.strength)

    def _fuzzer(self, strength: float) -> GaussianFuzzer:
        params = dict(self.module.named_parameters())
        return GaussianFuzzer({k: params[k] for k in self.target.weights}, strength, self.config.seed,
                              int(self.config.cache_mb * 2**20))

    @property
    def strength(self) -> float:
        """The mutation strength r in use (the calibrated one once fitted with `target_clean_lcr`)."""
        return self.fuzzer.strength

    def _set_strength(self, strength: float) -> None:
        self.fuzzer = self._fuzzer(strength)

    def layers(self) -> list[str]:
        """The probe layers the mutants read: the mutated part's inputs, and where the test samples the last
        convolution's output noise, that convolution's own output (not computed again)."""
        sampled = [self.target.tail.start] if self._noise is not None and self.target.tail is not None else []
        return list(self.target.inputs) + sampled

    def mutant_logits(self, inputs: tuple[torch.Tensor, ...], ids: range) -> torch.Tensor:
        """(len(ids), N, classes) logits of mutants `ids` on `inputs` (what the mutated module takes: `inputs_of`),
        in eval mode and WITH autograd's graph, so that they are differentiable with respect to `inputs`
        (adaptive attacks take expectations over the mutants; the test takes argmaxes)."""
        return self._logits(self.fuzzer.mutants(ids), inputs)

    def _logits(self, params: dict[str, torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The logits of the stacked mutant parameters `params` on `inputs` (see `mutant_logits`)."""
        with eval_mode(self.module):
            if self._stackable:
                return self._stacked_logits(params, inputs[0])
            fixed = {n: p.detach() for n, p in self.module.named_parameters() if n not in params}
            fixed.update({n: b for n, b in self.module.named_buffers()})

            def one(mutant: dict[str, torch.Tensor], *xb: torch.Tensor) -> torch.Tensor:
                return functional_call(self.module, {**fixed, **mutant}, xb)

            return vmap(one, in_dims=(0, *(None,) * len(inputs)))(params, *inputs)

    def _flips(self, inputs: tuple[torch.Tensor, ...], base: torch.Tensor, ids: range) -> torch.Tensor:
        """(len(ids), N) bool: does mutant i change the label of input j? Inputs go in batches of at most
        `batch_size`, fewer where the mutants' activations would pass MUTANT_ELEMENTS (a tail's feature maps)."""
        params = self.fuzzer.mutants(ids)
        device = next(iter(params.values())).device
        size = self._batch(len(ids), inputs)
        out = []
        with torch.no_grad():
            for start in range(0, inputs[0].shape[0], size):
                xb = tuple(t[start : start + size].to(device) for t in inputs)
                pred = self._logits(params, xb).argmax(dim=-1).cpu()
                out.append(pred != base[start : start + size].view(1, -1))
        return torch.cat(out, dim=1)

    def _batch(self, mutants: int, values: tuple[torch.Tensor, ...], most: int = MUTANT_ELEMENTS) -> int:
        """Inputs per batch: `batch_size`, fewer where `mutants` copies of their `values` pass `most` values."""
        per_input = mutants * sum(t[0].numel() for t in values) if len(values[0]) else 1
        return max(1, min(self.config.batch_size, most // per_input))

    def _prepare(self, inputs: tuple[torch.Tensor, ...],
                 conv_out: torch.Tensor | None = None) -> tuple[torch.Tensor, ...] | None:
        """Where the test samples the last convolution's output noise (`conv_noise`), the per-input values it
        reuses for every mutant: the convolution's output (`conv_out` when the probe captured it) plus the mutants'
        mean shift, the noise factors, and the values the rest of the tail reads. None where the mutants run as
        modules."""
        tail = self.target.tail
        if self._noise is None or tail is None or not self._noise.worthwhile(inputs[tail.conv_input]):
            return None
        x = inputs[tail.conv_input]
        mean, _ = self.fuzzer.stats[self.target.weights[0]]
        with torch.no_grad():
            lt, sums = self._noise.factors(x)
            out = self._noise.conv(x) if conv_out is None else conv_out
            shifted = out + self._noise.mean_shift(sums, mean).view_as(out)
        return (shifted, lt, *(inputs[i] for i in tail.rest_inputs))

    def _sampled_flips(self, prepared: tuple[torch.Tensor, ...], base: torch.Tensor, ids: range) -> torch.Tensor:
        """`_flips` from the values of `_prepare`: each mutant's output noise is sampled per input and the rest of
        the tail runs on the noisy convolution outputs, all mutants of a batch at once (`run_mutants`)."""
        shifted, lt, *others = prepared
        rest = self.target.tail.rest  # type: ignore[union-attr]
        _, std = self.fuzzer.stats[self.target.weights[0]]
        m = len(ids)
        size = self._batch(m, (shifted, *others), SAMPLED_ELEMENTS)
        u = self._noise.draw(ids, lt.shape[2])  # type: ignore[union-attr]
        out = []
        with torch.no_grad(), eval_mode(rest):
            for start in range(0, shifted.shape[0], size):
                block = slice(start, start + size)
                noise = self._noise.sample(lt[block], u, std).reshape(m, *shifted[block].shape)  # type: ignore
                logits = run_mutants(rest, m, Noisy(shifted[block], noise), *(t[block] for t in others))
                pred = logits.argmax(dim=-1).view(m, -1).cpu()
                out.append(pred != base[block].view(1, -1))
        return torch.cat(out, dim=1)

    def _blocks(self, inputs: tuple[torch.Tensor, ...]) -> list[slice]:
        """The inputs in blocks whose `_prepare` values fit PREPARED_ELEMENTS (one block where nothing is
        prepared): the test runs block by block, each input's result the same either way."""
        n = inputs[0].shape[0]
        tail = self.target.tail
        if self._noise is None or tail is None or n == 0:
            return [slice(0, n)]
        x = inputs[tail.conv_input]
        ho, wo = self._noise.output_size(x)
        npos = ho * wo
        per_input = npos * (self._noise.conv.out_channels + self._noise.conv.groups * npos) + sum(
            inputs[i][0].numel() for i in tail.rest_inputs)
        size = max(1, PREPARED_ELEMENTS // per_input)
        return [slice(start, min(start + size, n)) for start in range(0, n, size)]

    def _stacked_logits(self, params: dict[str, torch.Tensor], xb: torch.Tensor) -> torch.Tensor:
        """(M, N, classes) logits of M mutants of a plain sequential head, as batched matrix products (the same
        arithmetic as `vmap` over `functional_call`, without its per-call dispatch)."""
        h = xb
        layers = [("", self.module)] if isinstance(self.module, nn.Linear) else self.module.named_children()
        for name, child in layers:
            if isinstance(child, nn.Linear):
                w = params.get(f"{name}.weight" if name else "weight", child.weight)
                h = torch.matmul(h, w.transpose(-1, -2))
                if child.bias is not None:
                    h = h + child.bias
            elif isinstance(child, nn.ReLU):
                h = torch.relu(h)
            elif not isinstance(child, (nn.Dropout, nn.Identity)):  # before the first dense layer
                h = child(h)
        return h

    def test(self, obs: Observation, sequential: bool | None = None, mutants: int | None = None) -> MutationTest:
        """Run the mutants (the first `mutants`, default max_mutants) over the inputs of `obs`, stopping each input
        early when the SPRT decides."""
        cfg = self.config
        total = cfg.max_mutants if mutants is None else min(mutants, cfg.max_mutants)
        sequential = cfg.sequential if sequential is None else sequential
        if sequential:
            self.check_fitted()
        inputs = self.inputs_of(obs)
        base = obs.pred
        n = len(obs)
        changes = np.zeros(n)
        used = np.zeros(n)
        decision = np.zeros(n, dtype=np.int8)
        sprt = self.sprt() if sequential else None
        blocks = self._blocks(inputs)
        conv_out = obs.features.get(self.target.tail.start) if self.target.tail is not None else None
        with counter(f"mutants (r={self.strength:.3g})", total * len(blocks),
                     enabled=cfg.progress) as advance:
            for block in blocks:
                prepared = self._prepare(tuple(t[block] for t in inputs), None if conv_out is None else conv_out[block])
                values, flips_of = (inputs, self._flips) if prepared is None else (prepared, self._sampled_flips)
                offset = 0 if prepared is None else block.start
                for start in range(0, total, cfg.chunk):
                    active = block.start + np.flatnonzero(decision[block] == 0)
                    if active.size == 0:
                        break
                    ids = range(start, min(start + cfg.chunk, total))
                    flips = flips_of(tuple(t[active - offset] for t in values), base[active], ids).sum(0).numpy()
                    changes[active] += flips
                    used[active] += len(ids)
                    if sprt is not None:
                        decision[active] = sprt.decide(changes[active], used[active])
                    advance(len(ids))
        lcr = changes / np.maximum(used, 1)
        if sprt is not None:
            undecided = decision == 0
            flagged = lcr > self.lcr_threshold_ if cfg.suspicious == "high" else lcr < self.lcr_threshold_
            decision[undecided] = np.where(flagged[undecided], 1, -1)
        return MutationTest(lcr=lcr, n_mutants=used.astype(np.int64), decision=decision)

    def _after_restore(self) -> None:
        if hasattr(self, "reach_"):
            saved, origin = self.reach_, self.target
        else:  # a file written before `reach_`: its mutants fuzzed the dense layers, in the head or the whole model
            saved, origin = ("model" if getattr(self, "whole_model_", False) else "head"), mutation_target(self.model)
        target = origin.whole_model(self.model) if saved == "model" and origin.reach != "model" else origin
        if target.reach != saved:
            raise ModelFileError(f"{self.name}: the saved state's mutants re-ran {saved!r}; this model and its "
                                 f"settings give {target.reach!r}")
        self._set_target(target)
        self._set_strength(self.strength_)

    def sprt(self) -> SPRT:
        """The sequential test around the calibrated LCR threshold."""
        self.check_fitted()
        cfg = self.config
        return SPRT.around(self.lcr_threshold_, cfg.indifference, cfg.suspicious == "high", cfg.alpha, cfg.beta)

    def _light_fit(self) -> bool:
        return self.config.light_tail_fit and self.target.reach == "last_conv"

    def _search_strength(self, clean: Observation, target: float, steps: int = 12) -> float:
        """Bisect log(r) until the mean clean LCR (on up to 256 inputs, or TAIL_SEARCH_INPUTS with
        `light_tail_fit`) is close to `target`."""
        light = self._light_fit()
        sample = _spread(clean, TAIL_SEARCH_INPUTS) if light else clean.subset(slice(0, 256))
        lo, hi = np.log(1e-3), np.log(100.0)
        for _ in range(steps):
            mid = 0.5 * (lo + hi)
            self._set_strength(float(np.exp(mid)))
            mean = self.test(sample, sequential=False, mutants=TAIL_SEARCH_MUTANTS if light else None).lcr.mean()
            if abs(mean - target) < 0.01:
                break
            lo, hi = (mid, hi) if mean < target else (lo, mid)
        return self.strength

    def fit(self, clean: Observation, y: torch.Tensor | None = None) -> "ModelMutation":
        """Calibrate the strength (if asked) and the LCR threshold at the clean `lcr_tail` quantile."""
        self._check_target(clean)
        self.reach_ = self.target.reach
        if self.config.target_clean_lcr is not None:
            self._search_strength(clean, self.config.target_clean_lcr)
        self.strength_ = self.strength
        lcr = self.test(_spread(clean, TAIL_THRESHOLD_INPUTS) if self._light_fit() else clean, sequential=False).lcr
        q = 1.0 - self.config.lcr_tail if self.config.suspicious == "high" else self.config.lcr_tail
        self.clean_lcr_mean_ = float(lcr.mean())
        self.lcr_threshold_ = float(np.quantile(lcr, q))
        return self

    def score(self, obs: Observation) -> np.ndarray:
        """LCR (suspicious high) or 1 - LCR (suspicious low) over the mutants the SPRT needed."""
        self.check_fitted()
        lcr = self.test(obs).lcr
        return lcr if self.config.suspicious == "high" else 1.0 - lcr

    def state(self) -> dict:
        """Settings and fitted values, JSON-able."""
        return {
            "config": asdict(self.config),
            "strength_": getattr(self, "strength_", None),
            "lcr_threshold_": getattr(self, "lcr_threshold_", None),
        }


# --- the study's two sides, as registered -------------------------------------------------------------

@dataclass(frozen=True)
class AdversarialMutationConfig(MutationConfig):
    """The adversarial side: a mild strength (r = 0.3), a HIGH label-change rate is suspicious."""

    strength: float = 0.3
    suspicious: Literal["high", "low"] = "high"


@dataclass(frozen=True)
class BackdoorMutationConfig(MutationConfig):
    """The backdoor side: a strong strength, calibrated on clean data from the study's r = 0.65 until the
    mean clean LCR is 0.6; a LOW label-change rate is suspicious."""

    strength: float = 0.65
    target_clean_lcr: float | None = 0.6
    suspicious: Literal["high", "low"] = "low"
    through_last_conv: bool = True


@dataclass(frozen=True)
class FixedBackdoorMutationConfig(MutationConfig):
    """The backdoor side as the study's code runs it: r = 0.65 kept, a LOW label-change rate is suspicious."""

    strength: float = 0.65
    suspicious: Literal["high", "low"] = "low"
    through_last_conv: bool = True


class AdversarialMutation(ModelMutation):
    """Mutation testing for adversarial examples: they flip label easily under mild mutation."""

    name = "mutation_adv"
    config_class = AdversarialMutationConfig
    evidence = ADVERSARIAL


class BackdoorMutation(ModelMutation):
    """Mutation testing for trigger inputs, at a strength calibrated on clean data: they resist it."""

    name = "mutation_bd"
    config_class = BackdoorMutationConfig
    evidence = BACKDOOR


class FixedBackdoorMutation(ModelMutation):
    """Mutation testing for trigger inputs at the study's fixed strength r = 0.65."""

    name = "mutation_bd_fixed"
    config_class = FixedBackdoorMutationConfig
    evidence = BACKDOOR
