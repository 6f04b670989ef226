"""Mahalanobis-distance detector (Lee, Lee, Lee and Shin, "A Simple Unified Framework for Detecting
Out-of-Distribution Samples and Adversarial Attacks", NeurIPS 2018).

Per layer, the features of an input (conv maps spatially averaged, (N, C, H, W) -> (N, C); dense layers as
they are) are compared with class-conditional Gaussians that share one (tied) covariance:

    mu_c  = mean of the clean features of class c,
    Sigma = (1 / N) sum_c sum_{i in c} (f_i - mu_c)(f_i - mu_c)^T,
    M_l(x) = min_c (f_l(x) - mu_c)^T Sigma^+ (f_l(x) - mu_c).

The layer score is the smallest SQUARED Mahalanobis distance to a class mean (the negative of the paper's
confidence score max_c -(f - mu_c)^T Sigma^-1 (f - mu_c)), so higher means more suspicious. Class means
and the shared covariance are streamed batch by batch (`ClassMoments`); the classes come from the labels
given to `fit`, else from the model's predictions. The inverse is the Moore-Penrose pseudo-inverse of
Sigma + ridge * (trace(Sigma) / d) * I: with `ridge` = 0 (the paper's estimator) it is the plain
pseudo-inverse, which stays defined when Sigma is rank-deficient (fewer reference inputs than feature
dimensions); a small positive ridge shrinks the directions that a small reference set estimates badly.

Optional input pre-processing (the paper's Eq. 4): x' = x - eps * sign(grad_x M_l(x)), a small step that
brings x closer to its closest class at layer l, then M_l(x') is the layer score. It needs the model's
gradients with respect to the input (forward hooks on the model, autograd with respect to the input only;
no parameter or `.grad` is touched and every module's `training` flag is restored). `noise_magnitude` = 0
(default) turns it off and then the detector only reads the probe pass.

Layers are combined without attack labels: each layer's score is standardised by its clean mean and
standard deviation and the MEAN over layers is the score (`combine="max"` takes
the maximum instead). The clean mean and standard deviation are cross-fitted: the fit inputs are split at
random into `folds` folds and each input is scored by the means and covariance of the other folds (merged
from per-fold streaming moments). In-sample scores would be badly optimistic: on the 8x8 digits model, a
256-dimensional covariance from 360 inputs puts held-out clean inputs 3.6 in-sample standard deviations
above the in-sample mean, which would let that layer dominate the combination. The paper's own
combination, a logistic regression trained on attack examples, is `fit_supervised`.
`PenultimateMahalanobis` (registered as "mahalanobis_penultimate"; also `Mahalanobis.penultimate(model)`)
is the plain single-layer "penultimate-layer Mahalanobis" baseline: `MahalanobisConfig(layers=(L,))` with L
the model's last hidden layer and no pre-processing.

Relation to pytorch-ood's `Mahalanobis` detector: it also pools conv maps by their spatial mean and returns
an outlier score that is larger for outliers, namely -max_c(-1/2 (f - mu_c)^T P (f - mu_c)) =
1/2 min_c (f - mu_c)^T P (f - mu_c), with P = inv(S + 1e-6 I) where S is the pooled within-class scatter
NOT divided by N. Its score equals this module's layer score / (2 N) up to that ridge (measured: largest
relative difference 3e-5 in float32, Spearman 1; benchmarks/results/peer_mahalanobis.md), so the two
rank inputs identically (same sign convention: higher = more outlying).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from malex.device import model_device
from malex.detectors.stats import (
    COMBINE_RULES, ClassMoments, PerLayerDetector, RunningMoments, batches, feature_matrix, fit_labels,
    penultimate_layer, preserved_modes,
)
from malex.errors import ConfigError, InputError
from malex.probe import INPUT_SUFFIX, Observation


#: per layer, whitened: class means times the whitener (K, r), the whitener W (d, r) with W W^T = precision,
#: and the classes present (K,)
LayerParams = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class MahalanobisConfig:
    """`layers`: probe layers to use (None: the model's probe layers); `noise_magnitude`: the input
    pre-processing step (0 = off); `ridge`: relative diagonal loading of the covariance (0 = plain
    pseudo-inverse); `combine`: "mean" or "max" over standardised layer scores; `folds`: cross-fitting
    folds for the clean score statistics (1 = in-sample), assigned at random by `seed`."""

    layers: tuple[str, ...] | None = None
    noise_magnitude: float = 0.0
    ridge: float = 0.0
    combine: str = "mean"
    folds: int = 5
    seed: int = 0
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.layers is not None:
            if isinstance(self.layers, str) or not all(isinstance(n, str) for n in self.layers) or not self.layers:
                raise ConfigError(f"layers is {self.layers!r}; expected a non-empty tuple of layer names")
            object.__setattr__(self, "layers", tuple(self.layers))
        if not self.noise_magnitude >= 0 or not self.ridge >= 0:
            raise ConfigError(f"noise_magnitude {self.noise_magnitude} and ridge {self.ridge} must be >= 0")
        if self.combine not in COMBINE_RULES:
            raise ConfigError(f"combine is {self.combine!r}; expected one of {', '.join(COMBINE_RULES)}")
        if self.batch_size < 1 or self.folds < 1:
            raise ConfigError(f"batch_size {self.batch_size} and folds {self.folds} must be at least 1")


def tied_whitener(covariance: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """W (d, r), float64, from one eigendecomposition of Sigma + ridge * trace(Sigma)/d * I, such that
    W W^T is its Moore-Penrose pseudo-inverse (eigenvalues below d * eps * the largest count as zero, as
    in `torch.linalg.pinv`) and r is its numerical rank: (f - mu)^T Sigma^+ (f - mu) = ||(f - mu) W||^2."""
    cov = covariance.to(torch.float64)
    d = cov.shape[0]
    if ridge > 0:
        cov = cov + torch.eye(d, dtype=cov.dtype) * (ridge * float(torch.diagonal(cov).mean()))
    vals, vecs = torch.linalg.eigh((cov + cov.T) / 2)
    keep = vals > vals.abs().max().clamp_min(1e-300) * d * torch.finfo(torch.float64).eps
    return vecs[:, keep] / vals[keep].sqrt()


def tied_precision(covariance: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """pinv(Sigma + ridge * trace(Sigma)/d * I), symmetric, float64."""
    w = tied_whitener(covariance, ridge)
    return w @ w.T


def layer_params(means: torch.Tensor, whitener: torch.Tensor, present: torch.Tensor) -> LayerParams:
    """The per-layer parameters `class_distances` takes: whitened class means, the whitener, presence."""
    return means.to(torch.float64) @ whitener, whitener, present


def class_distances(f: torch.Tensor, params: LayerParams) -> torch.Tensor:
    """(N, K) squared Mahalanobis distances of rows `f` to every class mean; +inf for absent classes.

    Computed in the whitened space, ||f W - mu_c W||^2: one (N, d) x (d, r) product for all classes
    instead of one quadratic form per class."""
    centers, w, present = params
    z = f.to(w.dtype) @ w
    d2 = (z.unsqueeze(1) - centers.unsqueeze(0)).square().sum(dim=2)
    return d2.masked_fill(~present.unsqueeze(0), float("inf"))


class Mahalanobis(PerLayerDetector):
    """Minimum class-conditional Mahalanobis distance per layer with a tied covariance, fitted on clean data."""

    name = "mahalanobis"
    config_class = MahalanobisConfig
    evidence = None
    config: MahalanobisConfig
    fitted_attributes = ("layers_", "means_", "whitener_", "class_counts_") + PerLayerDetector.common_attributes

    def __init__(self, model: nn.Module, config: MahalanobisConfig | None = None) -> None:
        super().__init__(model, config)
        self._whitened: dict[str, LayerParams] = {}

    @staticmethod
    def penultimate(model: nn.Module, **settings: object) -> "PenultimateMahalanobis":
        """The plain penultimate-layer Mahalanobis detector: one layer (the last hidden), no pre-processing;
        `settings` are the fields of `PenultimateConfig`."""
        return PenultimateMahalanobis(model, PenultimateConfig(**settings))

    def fit(self, clean: Observation, y: torch.Tensor | None = None) -> "Mahalanobis":
        """Stream class means and the tied covariance per layer (labels `y`, else the model's predictions),
        then the clean mean and std of every layer score, cross-fitted over `folds` folds."""
        if len(clean) < 2:
            raise InputError(f"Mahalanobis needs at least 2 clean inputs to fit; got {len(clean)}")
        num_classes = int(clean.logits.shape[1])
        labels = fit_labels(clean, y, num_classes)
        # one layer: standardising is a positive affine map that no ranking or threshold sees, so the
        # in-sample statistics do and the cross-fitting is skipped
        n_folds = self.config.folds if len(self._layers) > 1 else 1
        folds: dict[str, list[ClassMoments]] = {}
        gen = torch.Generator().manual_seed(self.config.seed)
        for sl in batches(len(clean), self.batch_size):
            fold_of = torch.randint(n_folds, (sl.stop - sl.start,), generator=gen)
            for name in self._layers:
                f = feature_matrix(clean.layer(name)[sl], pool=True)
                if name not in folds:
                    folds[name] = [ClassMoments(num_classes, f.shape[1]) for _ in range(n_folds)]
                for j in fold_of.unique().tolist():
                    folds[name][j].update(f[fold_of == j], labels[sl][fold_of == j])
        full = {n: ClassMoments.merge(parts) for n, parts in folds.items()}
        self.layers_ = list(self._layers)
        self.class_counts_ = full[self._layers[0]].counts.clone()
        self.means_ = {n: s.means.clone() for n, s in full.items()}
        self.whitener_ = {n: tied_whitener(m.tied_covariance(), self.config.ridge) for n, m in full.items()}
        self._whitened = {}
        self.coef_ = self.intercept_ = None

        # Clean score statistics: each input is scored by the model fitted without its fold.
        if n_folds == 1:
            held_out = [self._params()]
        else:
            held_out = []
            for j in range(n_folds):
                rest = {n: ClassMoments.merge(p for i, p in enumerate(parts) if i != j) for n, parts in folds.items()}
                if next(iter(rest.values())).n == 0:  # every input fell in fold j
                    held_out.append(self._params())
                    continue
                held_out.append({
                    n: layer_params(m.means, tied_whitener(m.tied_covariance(), self.config.ridge), m.counts > 0)
                    for n, m in rest.items()
                })
        moments = RunningMoments(len(self._layers), diagonal=True)
        gen = torch.Generator().manual_seed(self.config.seed)
        for sl in batches(len(clean), self.batch_size):
            fold_of = torch.randint(n_folds, (sl.stop - sl.start,), generator=gen)
            part = clean.subset(sl)
            for j in fold_of.unique().tolist():
                moments.update(torch.from_numpy(self._scores_with(part.subset(fold_of == j), held_out[j])))
        self._set_standardisation(moments)
        return self

    def _params(self) -> dict[str, LayerParams]:
        """Whitened parameters of every layer, computed once after each fit or restore."""
        for n in self.layers_:
            if n not in self._whitened:
                self._whitened[n] = layer_params(self.means_[n], self.whitener_[n], self.class_counts_ > 0)
        return {n: self._whitened[n] for n in self.layers_}

    def _after_restore(self) -> None:
        self._whitened = {}

    @property
    def precision_(self) -> dict[str, torch.Tensor]:
        """Per layer, the precision matrix W W^T (the pseudo-inverse of the tied covariance)."""
        self.check_fitted()
        return {n: w @ w.T for n, w in self.whitener_.items()}

    def distances(self, obs: Observation, layer: str) -> torch.Tensor:
        """(N, K) squared Mahalanobis distances of the captured features at `layer` to each class mean."""
        self.check_fitted()
        return class_distances(feature_matrix(obs.layer(layer), pool=True), self._params()[layer])

    def _raw_scores(self, obs: Observation) -> np.ndarray:
        return self._scores_with(obs, self._params())

    def _scores_with(self, obs: Observation, params: dict[str, LayerParams]) -> np.ndarray:
        """(N, L) minimum squared distances under the given whitened per-layer parameters."""
        cols = []
        for name in self.layers():
            out = []
            for sl in batches(len(obs), self.batch_size):
                if self.config.noise_magnitude > 0:
                    f = self._preprocessed_features(obs.x[sl], name, params[name])
                else:
                    f = feature_matrix(obs.layer(name)[sl], pool=True)
                out.append(class_distances(f, params[name]).min(dim=1).values)
            cols.append(torch.cat(out) if out else torch.empty(0, dtype=torch.float64))
        return torch.stack(cols, dim=1).double().numpy()

    def _layer_output(self, x: torch.Tensor, layer: str) -> torch.Tensor:
        """Pooled features of `layer` for inputs `x`, differentiable with respect to `x`."""
        modules = dict(self.model.named_modules())
        store: list[torch.Tensor] = []
        if layer.endswith(INPUT_SUFFIX):
            handle = modules[layer[: -len(INPUT_SUFFIX)]].register_forward_pre_hook(lambda _m, a: store.append(a[0]))
        else:
            handle = modules[layer].register_forward_hook(lambda _m, _a, out: store.append(out))
        try:
            self.model(x)
        finally:
            handle.remove()
        return feature_matrix(store[0], pool=True)

    def _preprocessed_features(self, x: torch.Tensor, layer: str, params: LayerParams) -> torch.Tensor:
        """Features at `layer` of x - eps * sign(grad_x min_c M_c(x)) (Lee et al., Eq. 4)."""
        device = model_device(self.model)
        params = tuple(t.to(device) for t in params)
        with preserved_modes(self.model), torch.enable_grad():
            xg = x.to(device).detach().clone().requires_grad_(True)
            d2 = class_distances(self._layer_output(xg, layer), params).min(dim=1).values
            (grad,) = torch.autograd.grad(d2.sum(), xg)
            x_pre = (xg - self.config.noise_magnitude * grad.sign()).detach()
            with torch.no_grad():
                return self._layer_output(x_pre, layer).cpu()

    def state(self) -> dict:
        return {"config": asdict(self.config), "layers": self.layers(), "supervised": self.supervised}


@dataclass(frozen=True)
class PenultimateConfig:
    """The settings of `MahalanobisConfig` that the penultimate-layer baseline leaves open (its layer is the
    model's last hidden one and it does no input pre-processing); the defaults are Mahalanobis's own."""

    ridge: float = MahalanobisConfig.ridge
    combine: str = MahalanobisConfig.combine
    folds: int = MahalanobisConfig.folds
    seed: int = MahalanobisConfig.seed
    batch_size: int = MahalanobisConfig.batch_size

    def __post_init__(self) -> None:
        self.resolve(None)  # the same checks as MahalanobisConfig

    def resolve(self, layer: str | None) -> MahalanobisConfig:
        """The full Mahalanobis settings on `layer` (None: the model's probe layers), without pre-processing."""
        return MahalanobisConfig(layers=None if layer is None else (layer,), noise_magnitude=0.0, **asdict(self))


class PenultimateMahalanobis(Mahalanobis):
    """Mahalanobis on the penultimate layer alone, a floor of every table; its `config` is the resolved
    `MahalanobisConfig`."""

    name = "mahalanobis_penultimate"
    config_class = PenultimateConfig

    def __init__(self, model: nn.Module, config: PenultimateConfig | None = None) -> None:
        settings = PenultimateConfig() if config is None else config
        super().__init__(model, settings.resolve(penultimate_layer(model)))
