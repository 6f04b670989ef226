"""Local intrinsic dimensionality (Ma, Li, Wang, Erfani, Wijewickrema, Schoenebeck, Song, Houle and
Bailey, "Characterizing Adversarial Subspaces Using Local Intrinsic Dimensionality", ICLR 2018).

Per layer, the features of an input are flattened (or spatially averaged with `pool=True`) and compared
with a reference set of clean features. The maximum-likelihood estimate of the input's LID from its k
nearest reference neighbours (distances r_1 <= ... <= r_k) is

    LID(x) = -1 / ( (1/k) sum_{i=1..k} log(r_i / r_k) ),

higher for inputs in high-dimensional, sparsely populated regions, which adversarial examples reach.

The reference set is a seeded uniform random subset of at most `max_reference` clean inputs (the same
inputs for every layer), drawn while streaming over the fit data (`BoundedSample`). A reference input
scored again would find itself at distance zero; neighbours at (numerically) zero distance are therefore
skipped, which makes the clean statistics computed at fit time over the whole fit set leave-one-out for
the inputs that are in the reference set. Neighbours are searched in float32 (`NeighbourIndex`; copies and
very close neighbours measured again in float64), one chunk of `batch_size` inputs at a time.

The original paper fits a logistic regression on the per-layer LIDs of clean, noisy and adversarial
minibatches; a deployed guard has no attack examples, so layers are combined without labels by default:
each layer's LID is standardised by its clean mean and standard deviation and the MEAN over layers is the
score (`combine="max"`: the maximum). `fit_supervised` reproduces the paper's logistic regression.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from malex.detectors.stats import (
    COMBINE_RULES, BoundedSample, PerLayerDetector, batches, feature_matrix, is_copy,
)
from malex.errors import ConfigError, InputError
from malex.probe import Observation

@dataclass(frozen=True)
class LIDConfig:
    """`k` neighbours among at most `max_reference` clean inputs (chosen by `seed`); `pool` averages conv
    maps over space instead of flattening them; `combine`: "mean" or "max" over standardised layers."""

    layers: tuple[str, ...] | None = None
    k: int = 20
    max_reference: int = 2000
    pool: bool = False
    combine: str = "mean"
    seed: int = 0
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.layers is not None:
            if isinstance(self.layers, str) or not all(isinstance(n, str) for n in self.layers) or not self.layers:
                raise ConfigError(f"layers is {self.layers!r}; expected a non-empty tuple of layer names")
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.k < 2:
            raise ConfigError(f"k is {self.k}; expected at least 2 neighbours")
        if self.max_reference <= self.k:
            raise ConfigError(f"max_reference {self.max_reference} must exceed k = {self.k}")
        if self.combine not in COMBINE_RULES:
            raise ConfigError(f"combine is {self.combine!r}; expected one of {', '.join(COMBINE_RULES)}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size is {self.batch_size}; expected at least 1")


def lid_mle(distances: torch.Tensor) -> torch.Tensor:
    """LID estimates from (N, k) ascending neighbour distances: -1 / mean_i log(r_i / r_k)."""
    r = distances.to(torch.float64).clamp_min(1e-30)
    mean_log = torch.log(r / r[:, -1:]).mean(dim=1)
    return -1.0 / mean_log.clamp(max=-1e-12)


def knn_distances(query: torch.Tensor, reference: torch.Tensor, k: int) -> torch.Tensor:
    """(N, k) ascending Euclidean distances from each query row to its k nearest reference rows, skipping
    reference rows that coincide with the query (zero distance). Exact, in float64."""
    q, ref = query.to(torch.float64), reference.to(torch.float64)
    d = torch.cdist(q, ref)
    scale = (q * q).sum(1, keepdim=True) + (ref * ref).sum(1).unsqueeze(0)
    d = d.masked_fill(is_copy(d * d, scale), float("inf"))
    return torch.topk(d, k, dim=1, largest=False, sorted=True).values


#: extra float32 candidates beyond k (room for copies of the query among the reference rows)
MARGIN = 4
#: squared distances below this share of ||q - m||^2 + ||r - m||^2 are measured again in float64: there the
#: float32 expansion's rounding (about 1e-7 of that sum) would be a large part of the distance
NEAR = 1e-3


class NeighbourIndex:
    """k-nearest-neighbour distances to a fixed reference set: the search is one float32 matrix product
    on rows centred at the reference mean; the distances of copies and very close neighbours are measured
    again in float64. LID estimates from it differ from an exact float64 search by about 1e-5 relative
    (tests/test_feature_space.py bounds it at 1e-4); at 2-3x its speed."""

    def __init__(self, reference: torch.Tensor) -> None:
        ref = reference.to(torch.float32)
        self.mean = ref.mean(dim=0)
        self.centred = (ref - self.mean).contiguous()
        self.sq_norms = (self.centred * self.centred).sum(dim=1)
        self.reference = ref

    def distances(self, query: torch.Tensor, k: int) -> torch.Tensor:
        """As `knn_distances(query, reference, k)`."""
        q = query.to(torch.float32) - self.mean
        q_sq = (q * q).sum(dim=1, keepdim=True)
        d2 = torch.addmm(q_sq + self.sq_norms.unsqueeze(0), q, self.centred.T, alpha=-2.0).clamp_min_(0)
        m = min(k + MARGIN, d2.shape[1])
        best, idx = torch.topk(d2, m, dim=1, largest=False, sorted=True)
        near = best <= NEAR * (q_sq + self.sq_norms[idx])
        if bool(near.any()):  # exact float64 distances where float32 cannot tell a copy from a near neighbour
            rows, cols = near.nonzero(as_tuple=True)
            exact = (self.reference[idx[rows, cols]].double() - query[rows].double()).square().sum(dim=1)
            scale = query[rows].double().square().sum(1) + self.reference[idx[rows, cols]].double().square().sum(1)
            best = best.double()
            best[rows, cols] = exact.masked_fill(is_copy(exact, scale), float("inf"))
            best = torch.sort(best, dim=1).values
        out = best[:, :k].double().sqrt()
        short = ~torch.isfinite(out).all(dim=1)  # more copies than the margin: search those rows exactly
        if bool(short.any()):
            out[short] = knn_distances(query[short], self.reference, k)
        return out


class LID(PerLayerDetector):
    """Per-layer LID estimates against a bounded clean reference set, standardised and combined."""

    name = "lid"
    config_class = LIDConfig
    evidence = None
    config: LIDConfig
    fitted_attributes = ("layers_", "reference_", "k_", "pool_") + PerLayerDetector.common_attributes

    def __init__(self, model: nn.Module, config: LIDConfig | None = None) -> None:
        super().__init__(model, config)
        self._index: dict[str, NeighbourIndex] = {}

    def fit(self, clean: Observation, y: torch.Tensor | None = None) -> "LID":
        """Sample the reference set while streaming over `clean` (labels are not used), then the clean
        mean and std of every layer's LID (leave-one-out for reference inputs)."""
        k = self.config.k
        if len(clean) <= k:
            raise InputError(f"LID needs more than k = {k} clean inputs to fit; got {len(clean)}")
        sample = BoundedSample(self.config.max_reference, self.config.seed)
        for sl in batches(len(clean), self.batch_size):
            sample.update({n: feature_matrix(clean.layer(n)[sl], self.config.pool).float() for n in self._layers})
        self.layers_ = list(self._layers)
        self.reference_ = {n: t.contiguous() for n, t in sample.rows.items()}
        self.k_ = k
        self.pool_ = bool(self.config.pool)
        self._index = {}
        self._fit_standardisation(clean)
        return self

    @property
    def n_reference(self) -> int:
        """How many clean inputs the reference set holds."""
        self.check_fitted()
        return int(next(iter(self.reference_.values())).shape[0])

    def _after_restore(self) -> None:
        self._index = {}

    def _neighbours(self, name: str) -> NeighbourIndex:
        """The search structure over a layer's reference rows, built once after each fit or restore."""
        if name not in self._index:
            self._index[name] = NeighbourIndex(self.reference_[name])
        return self._index[name]

    def _raw_scores(self, obs: Observation) -> np.ndarray:
        cols = []
        for name in self.layers_:
            index = self._neighbours(name)
            out = [
                lid_mle(index.distances(feature_matrix(obs.layer(name)[sl], self.pool_), self.k_))
                for sl in batches(len(obs), self.batch_size)
            ]
            cols.append(torch.cat(out) if out else torch.empty(0, dtype=torch.float64))
        return torch.stack(cols, dim=1).numpy()

    def state(self) -> dict:
        return {"config": asdict(self.config), "layers": self.layers(), "supervised": self.supervised}
