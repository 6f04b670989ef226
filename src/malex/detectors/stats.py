"""Shared pieces of the feature-space detectors (Mahalanobis, LID, KD+BU).

* Streaming statistics: `RunningMoments` (mean and covariance of a stream) and `ClassMoments`
  (per-class counts and means with the pooled within-class scatter). Both merge batch summaries with the
  pairwise update of Chan, Golub and LeVeque (1979): a batch contributes its count, its mean and its
  centred outer-product sum; the merge adds the correction n_a n_b / n * delta delta^T. This is the same
  sufficient statistic as (count, sum, sum of outer products), kept in a centred form that does not lose
  precision when features have large means. Memory depends on the feature dimension, never on the number
  of inputs.
* `BoundedSample`: a seeded uniform random subset of at most `cap` rows of a stream (optionally per
  group, e.g. per class). Every row gets a random key; the `cap` smallest keys are kept ("bottom-k"
  sampling, equivalent to reservoir sampling). Memory is O(cap + batch).
* `LayerwiseDetector`: the part the three detectors share. A subclass computes one raw score per input
  and per column (a layer, or KD and BU), oriented so that higher is more suspicious. Fitting on clean
  data records each column's clean mean and standard deviation (streamed); the unsupervised score
  standardises every column by these and combines them WITHOUT attack labels, by the mean over columns
  (default) or the max. `fit_supervised` instead fits a logistic regression on the standardised columns of
  labelled clean and malicious inputs, as the original papers do, and stores it as plain arrays.
"""

from __future__ import annotations

from abc import abstractmethod
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from malex.detectors.base import Detector
from malex.errors import ConfigError, InputError
from malex.probe import INPUT_SUFFIX, Observation, default_layers, penultimate_layer  # noqa: F401 (re-exported)

COMBINE_RULES = ("mean", "max")
#: relative squared distance ||q - r||^2 / (||q||^2 + ||r||^2) below which a reference row counts as a copy
#: of the query (LID and KD skip such rows, so a reference input scored again is left out of its own set)
ZERO_DISTANCE = 1e-12


def is_copy(d2: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Where a squared distance d2 between a query and a reference row (scale: ||q||^2 + ||r||^2, broadcast
    to d2) marks the row as a copy of the query, by ZERO_DISTANCE."""
    return d2 <= ZERO_DISTANCE * scale + 1e-300


# --- features -------------------------------------------------------------------------------------------

def feature_matrix(t: torch.Tensor, pool: bool) -> torch.Tensor:
    """(N, D) view of captured features: conv maps (N, C, H, W) are spatially averaged to (N, C) when
    `pool`, else flattened; dense features are returned as they are."""
    if t.dim() == 1:
        return t.unsqueeze(1)
    if pool and t.dim() > 2:
        return t.flatten(2).mean(dim=2)
    return t.flatten(1)


def check_layers(model: nn.Module, names: Iterable[str]) -> list[str]:
    """The layer names, after checking that `model` has them (a ":in" suffix names a module's input)."""
    modules = {n for n, _ in model.named_modules() if n}
    names = list(names)
    if not names:
        raise ConfigError("no layers given; expected at least one layer name")
    for name in names:
        base = name[: -len(INPUT_SUFFIX)] if name.endswith(INPUT_SUFFIX) else name
        if base not in modules:
            raise ConfigError(f"model has no layer {base!r}; layers: {', '.join(sorted(modules))}")
    return names


def fit_labels(clean: Observation, y: torch.Tensor | None, num_classes: int) -> torch.Tensor:
    """The labels to fit class statistics with: `y` when given (checked), else the model's predictions."""
    if y is None:
        return clean.pred
    y = torch.as_tensor(y).long().flatten()
    if y.shape[0] != len(clean):
        raise InputError(f"{y.shape[0]} labels for {len(clean)} inputs; expected one label per input")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise InputError(f"labels must lie in [0, {num_classes}); got range [{int(y.min())}, {int(y.max())}]")
    return y


def batches(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of at most `size` over range(n)."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


@contextmanager
def preserved_modes(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode for the block, then give each module back its own `training` flag.

    Unlike `model.train(previous)`, this restores models whose modules had mixed flags exactly.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


# --- streaming statistics -------------------------------------------------------------------------------

class RunningMoments:
    """Streaming mean and covariance (or per-column variance when `diagonal`) in float64."""

    def __init__(self, dim: int, diagonal: bool = False) -> None:
        self.n = 0
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.m2 = torch.zeros(dim if diagonal else (dim, dim), dtype=torch.float64)
        self.diagonal = diagonal

    def update(self, x: torch.Tensor) -> "RunningMoments":
        """Add a batch of rows (b, dim)."""
        x = torch.as_tensor(x).detach().to(torch.float64).cpu()
        nb = x.shape[0]
        if nb == 0:
            return self
        mb = x.mean(dim=0)
        c = x - mb
        m2b = (c * c).sum(dim=0) if self.diagonal else c.T @ c
        if self.n == 0:
            self.mean, self.m2 = mb, m2b
        else:
            delta = mb - self.mean
            total = self.n + nb
            corr = delta * delta if self.diagonal else torch.outer(delta, delta)
            self.m2 = self.m2 + m2b + corr * (self.n * nb / total)
            self.mean = self.mean + delta * (nb / total)
        self.n += nb
        return self

    def covariance(self, ddof: int = 0) -> torch.Tensor:
        """Scatter / (n - ddof): the covariance matrix, or the variances when `diagonal`."""
        if self.n - ddof <= 0:
            raise InputError(f"need more than {ddof} rows for a covariance; got {self.n}")
        return self.m2 / (self.n - ddof)


class ClassMoments:
    """Streaming per-class counts and means, and the pooled within-class scatter sum_c sum_i (x - mu_c)(x - mu_c)^T."""

    def __init__(self, num_classes: int, dim: int) -> None:
        self.counts = torch.zeros(num_classes, dtype=torch.int64)
        self.means = torch.zeros(num_classes, dim, dtype=torch.float64)
        self.scatter = torch.zeros(dim, dim, dtype=torch.float64)

    @property
    def n(self) -> int:
        """Rows seen so far."""
        return int(self.counts.sum())

    def update(self, x: torch.Tensor, labels: torch.Tensor) -> "ClassMoments":
        """Add a batch of rows (b, dim) with their class labels (b,): the batch's own moments (one product
        for all classes), merged into the running ones."""
        x = torch.as_tensor(x).detach().to(torch.float64).cpu()
        labels = torch.as_tensor(labels).long().cpu()
        onehot = torch.nn.functional.one_hot(labels, self.counts.shape[0]).to(torch.float64)  # (b, K)
        counts = onehot.sum(dim=0)
        means = (onehot.T @ x) / counts.clamp_min(1).unsqueeze(1)
        centred = x - means[labels]
        self._absorb(counts.to(torch.int64), means, centred.T @ centred)
        return self

    def _absorb(self, counts: torch.Tensor, means: torch.Tensor, scatter: torch.Tensor) -> None:
        """Merge another stream's counts, class means and within-class scatter into this one."""
        na, nb = self.counts.to(torch.float64), counts.to(torch.float64)
        total = (na + nb).clamp_min(1)
        delta = means - self.means
        w = (na * nb / total).unsqueeze(1)  # zero when either side has no rows of the class
        self.scatter = self.scatter + scatter + (delta * w).T @ delta
        self.means = self.means + delta * (nb / total).unsqueeze(1)
        self.counts = self.counts + counts

    @staticmethod
    def merge(parts: Iterable["ClassMoments"]) -> "ClassMoments":
        """The moments of the union of the streams summarised by `parts` (same classes and dimension)."""
        parts = list(parts)
        out = ClassMoments(parts[0].means.shape[0], parts[0].means.shape[1])
        for p in parts:
            out._absorb(p.counts, p.means, p.scatter)
        return out

    def tied_covariance(self) -> torch.Tensor:
        """The shared covariance of Lee et al.: pooled within-class scatter / N (maximum likelihood)."""
        if self.n == 0:
            raise InputError("no rows seen; cannot form a covariance")
        return self.scatter / self.n


class BoundedSample:
    """A seeded uniform random subset of at most `cap` stream rows per group (bottom-k random keys).

    Rows are dicts of tensors sharing their first dimension (e.g. several layers of the same inputs), so
    that every field keeps the same inputs. `index` gives each kept row's position in the stream.
    """

    def __init__(self, cap: int, seed: int) -> None:
        if cap < 1:
            raise ConfigError(f"sample cap is {cap}; expected at least 1")
        self.cap = cap
        self.gen = torch.Generator().manual_seed(seed)
        self.seen = 0
        self.keys = torch.empty(0, dtype=torch.float64)
        self.groups = torch.empty(0, dtype=torch.int64)
        self.index = torch.empty(0, dtype=torch.int64)
        self.rows: dict[str, torch.Tensor] = {}

    def update(self, rows: dict[str, torch.Tensor], groups: torch.Tensor | None = None) -> "BoundedSample":
        """Offer a batch of rows (and their group ids; one group when None)."""
        b = next(iter(rows.values())).shape[0]
        if b == 0:
            return self
        keys = torch.rand(b, generator=self.gen, dtype=torch.float64)
        groups = torch.zeros(b, dtype=torch.int64) if groups is None else torch.as_tensor(groups).long().cpu()
        index = torch.arange(self.seen, self.seen + b)
        self.seen += b
        if not self.rows:
            self.rows = {k: v[:0].detach().cpu().clone() for k, v in rows.items()}
        all_keys = torch.cat([self.keys, keys])
        all_groups = torch.cat([self.groups, groups])
        order = torch.argsort(all_keys, stable=True)
        order = order[torch.argsort(all_groups[order], stable=True)]  # by group, then by key
        sorted_groups = all_groups[order]
        rank = torch.arange(len(order)) - torch.searchsorted(sorted_groups, sorted_groups)
        keep = order[rank < self.cap]
        keep = keep[torch.argsort(torch.cat([self.index, index])[keep])]  # back to stream order
        self.keys, self.groups = all_keys[keep], all_groups[keep]
        self.index = torch.cat([self.index, index])[keep]
        self.rows = {k: torch.cat([self.rows[k], v.detach().cpu()])[keep] for k, v in rows.items()}
        return self


# --- combining per-layer scores -------------------------------------------------------------------------

def combine_columns(z: np.ndarray, rule: str) -> np.ndarray:
    """Combine standardised columns (N, L) into one score per input by `rule` ("mean" or "max")."""
    if rule == "mean":
        return z.mean(axis=1)
    if rule == "max":
        return z.max(axis=1)
    raise ConfigError(f"combine rule {rule!r}; expected one of {', '.join(COMBINE_RULES)}")


def fit_logistic(clean: np.ndarray, malicious: np.ndarray, c: float = 1.0) -> tuple[np.ndarray, float]:
    """Logistic regression (L2, class-balanced) of malicious vs clean rows; returns (coef, intercept)."""
    from sklearn.linear_model import LogisticRegression

    x = np.concatenate([clean, malicious]).astype(np.float64)
    y = np.r_[np.zeros(len(clean)), np.ones(len(malicious))]
    lr = LogisticRegression(C=c, class_weight="balanced", max_iter=1000)
    lr.fit(x, y)
    return lr.coef_.ravel().astype(np.float64), float(lr.intercept_[0])


class LayerwiseDetector(Detector):
    """Per-column raw scores, standardised by clean statistics, combined without or with attack labels.

    Subclasses implement `_raw_scores` (N, L) and `columns`, and call `_fit_standardisation` at the end of
    `fit`. Fitted here: `score_mean_`, `score_std_` (per column, on the clean fit inputs), and `coef_`,
    `intercept_` (None until `fit_supervised`).
    """

    #: attributes every layer-wise detector sets in `fit`
    common_attributes: tuple[str, ...] = ("score_mean_", "score_std_", "coef_", "intercept_")

    def __init__(self, model: nn.Module, config: Any = None) -> None:
        """`config` is the detector's dataclass (None: its defaults); its `combine` and `batch_size` are read here."""
        super().__init__(model, config)
        self.combine: str = self.config.combine
        self.batch_size: int = self.config.batch_size

    @abstractmethod
    def _raw_scores(self, obs: Observation) -> np.ndarray:
        """(N, L) float64 raw scores, higher = more suspicious; needs the core fitted state only."""

    @property
    @abstractmethod
    def columns(self) -> list[str]:
        """Names of the score columns (layers, or "kd"/"bu")."""

    @property
    def supervised(self) -> bool:
        """Whether `fit_supervised` has set a logistic regression that `score` uses."""
        return getattr(self, "coef_", None) is not None

    def _fit_standardisation(self, clean: Observation) -> None:
        """Stream the clean raw scores into per-column mean and std; reset any supervised fit."""
        moments = RunningMoments(len(self.columns), diagonal=True)
        for sl in batches(len(clean), self.batch_size):
            moments.update(torch.from_numpy(self._raw_scores(clean.subset(sl))))
        self._set_standardisation(moments)

    def _set_standardisation(self, moments: RunningMoments) -> None:
        """Set `score_mean_` and `score_std_` from streamed clean raw scores; reset any supervised fit."""
        std = moments.covariance().sqrt().numpy()
        self.score_mean_ = moments.mean.numpy().copy()
        self.score_std_ = np.where(std > 1e-12, std, 1.0)
        self.coef_ = None
        self.intercept_ = None

    def layer_scores(self, obs: Observation) -> np.ndarray:
        """(N, L) raw per-column scores, oriented so that higher is more suspicious."""
        self.check_fitted()
        return self._raw_scores(obs)

    def standardized_scores(self, obs: Observation) -> np.ndarray:
        """(N, L) per-column scores standardised by their clean mean and standard deviation."""
        return (self.layer_scores(obs) - self.score_mean_) / self.score_std_

    def score(self, obs: Observation) -> np.ndarray:
        """The logistic-regression log-odds when fitted supervised, else the unsupervised combination."""
        z = self.standardized_scores(obs)
        if self.supervised:
            return (z @ np.asarray(self.coef_, dtype=np.float64) + float(self.intercept_)).astype(np.float64)
        return combine_columns(z, self.combine).astype(np.float64)

    def fit_supervised(self, clean: Observation, malicious: Observation, c: float = 1.0) -> "LayerwiseDetector":
        """The original papers' mode: a logistic regression on the standardised columns of labelled clean
        and malicious inputs (use inputs other than the clean reference passed to `fit`). Needs `fit` first;
        `score` then returns the regression's log-odds until the next `fit`."""
        self.check_fitted()
        if len(clean) == 0 or len(malicious) == 0:
            raise InputError(f"need clean and malicious inputs; got {len(clean)} and {len(malicious)}")
        zc = (self._raw_scores(clean) - self.score_mean_) / self.score_std_
        zm = (self._raw_scores(malicious) - self.score_mean_) / self.score_std_
        self.coef_, self.intercept_ = fit_logistic(zc, zm, c)
        return self


class PerLayerDetector(LayerwiseDetector):
    """A layer-wise detector with one score column per chosen layer: `config.layers`, or the model's default
    layers when that is None. `fit` sets `layers_`."""

    def __init__(self, model: nn.Module, config: Any = None) -> None:
        super().__init__(model, config)
        layers = self.config.layers
        self._layers = check_layers(model, layers if layers is not None else default_layers(model))

    def layers(self) -> list[str]:
        return list(getattr(self, "layers_", self._layers))

    @property
    def columns(self) -> list[str]:
        return self.layers()
