"""A differentiable stand-in for a fitted guard's evidence, for adaptive attacks.

An adaptive attack (malex.attacks.adversarial.adaptive_pgd) knows only "a callable that returns per-input
differentiable evidence, positive where the guard flags". `GuardEvidence(guard)` is that callable for a fitted
`Guard`: one forward pass that keeps autograd's graph (`malex.probe.trace`), each member's score computed from it
by a differentiable surrogate, each score turned into -ln p by a smooth version of the guard's own p-value, and
Fisher's sum minus the guard's calibrated threshold:

    evidence(x) = sum_d -2 ln p~_d(s~_d(x)) - threshold.

Member surrogates (`surrogate_for`):

* Mahalanobis, LID, MSP: the detector's own score, differentiable as it stands (the minimum over class
  distances, the k nearest reference distances and the softmax are differentiable almost everywhere), with the
  same clean standardisation and combination over layers. Mahalanobis's optional input pre-processing is left out.
* KD+BU: the KD column (the Gaussian kernel density among the references of the predicted class) exactly and
  differentiably; the BU column (Monte-Carlo dropout, only for models with dropout) enters with its true value
  but no gradient.
* Model mutation (both sides): the label-change rate over the detector's OWN first `mutants` mutants, each hard
  label change replaced by a soft one, sigmoid((max_{j != base} z_j - z_base) / temperature) on the mutant's
  logits z, base being the model's label: an expectation over the mutants of a soft label change (EOT).

The smooth p-value: the conformal p-value (1 + #{clean >= s}) / (n + 1) with the count replaced by a sum of
sigmoids (c_i - s) / h (h: `smoothing` times Silverman's bandwidth of the calibration scores), and beyond the
tail threshold the guard's own exponential tail (`tail_parameters`), so that -ln p keeps growing linearly with
the score beyond every clean one, as the guard's does. It is monotone in the score, as the real p-value is.

`rank_agreement` measures how well each surrogate ranks inputs as the real detector does (Spearman), and
`gradient_check` checks the surrogate's gradients numerically in float64.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from malex.detectors import KDBU, LID, MSP, Detector, Mahalanobis, ModelMutation
from malex.detectors.kd_bu import log_kernel_density
from malex.detectors.lid import knn_distances, lid_mle
from malex.detectors.mahalanobis import class_distances, layer_params
from malex.detectors.stats import LayerwiseDetector, feature_matrix
from malex.device import model_device
from malex.errors import ConfigError, InputError
from malex.guard.guard import Guard
from malex.guard.pvalues import tail_parameters
from malex.probe import Observation, trace

#: per-input differentiable evidence of a batch of inputs: positive where the guard (or detector) flags
Evidence = Callable[[torch.Tensor], torch.Tensor]
#: a member's differentiable score from a traced observation
MemberScore = Callable[[Observation], torch.Tensor]


@dataclass(frozen=True)
class SurrogateConfig:
    """`mutants`: mutants of each mutation detector averaged over (its own first ones); `temperature`: of the
    soft label change; `smoothing`: the smooth p-value's bandwidth in multiples of Silverman's rule."""

    mutants: int = 20
    temperature: float = 1.0
    smoothing: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.mutants, bool) or not isinstance(self.mutants, int) or self.mutants < 1:
            raise ConfigError(f"mutants is {self.mutants!r}; expected an int >= 1")
        for name in ("temperature", "smoothing"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} is {value!r}; expected a finite number > 0")


def _standardised(det: LayerwiseDetector, raw: torch.Tensor) -> torch.Tensor:
    """A layer-wise detector's score from its (N, L) raw columns: standardised by the clean statistics, then its
    logistic regression when fitted supervised, else the mean or max over columns (as `LayerwiseDetector.score`)."""
    mean = torch.as_tensor(det.score_mean_, dtype=raw.dtype, device=raw.device)
    std = torch.as_tensor(det.score_std_, dtype=raw.dtype, device=raw.device)
    z = (raw - mean) / std
    if det.supervised:
        return z @ torch.as_tensor(det.coef_, dtype=z.dtype, device=z.device) + float(det.intercept_)
    return z.mean(dim=1) if det.combine == "mean" else z.amax(dim=1)


def mahalanobis_score(det: Mahalanobis) -> MemberScore:
    """Minimum squared Mahalanobis distance per layer to a class mean, standardised and combined."""
    present = det.class_counts_ > 0

    def score(obs: Observation) -> torch.Tensor:
        cols = []
        for name in det.layers_:
            f = feature_matrix(obs.layer(name), pool=True)
            centers, w, keep = layer_params(det.means_[name], det.whitener_[name], present)
            params = (centers.to(f.device), w.to(f.device), keep.to(f.device))
            cols.append(class_distances(f, params).min(dim=1).values)
        return _standardised(det, torch.stack(cols, dim=1))

    return score


def kd_score(det: KDBU) -> MemberScore:
    """Minus the log kernel density among the references of the predicted class; BU (when used) by value."""

    def score(obs: Observation) -> torch.Tensor:
        f = feature_matrix(obs.layer(det.layer_), pool=False)
        kd = -log_kernel_density(f.cpu(), obs.logits.argmax(dim=1).cpu(), det.reference_, det.reference_labels_,
                                 det.bandwidth_)
        cols = [kd]
        if det.use_bu_:
            plain = Observation(obs.x.detach().cpu(), obs.logits.detach().cpu(),
                                {k: v.detach().cpu() for k, v in obs.features.items()})
            cols.append(torch.from_numpy(det.bu(plain)))
        return _standardised(det, torch.stack(cols, dim=1)).to(obs.logits.device)

    return score


def lid_score(det: LID) -> MemberScore:
    """The maximum-likelihood LID from the k nearest clean references per layer, standardised and combined."""

    def score(obs: Observation) -> torch.Tensor:
        cols = [lid_mle(knn_distances(feature_matrix(obs.layer(n), det.pool_), det.reference_[n].to(obs.x.device),
                                      det.k_)) for n in det.layers_]
        return _standardised(det, torch.stack(cols, dim=1))

    return score


def msp_score(det: MSP) -> MemberScore:
    """One minus the largest softmax probability."""
    return lambda obs: 1.0 - torch.softmax(obs.logits.double() / det.config.temperature, dim=1).amax(dim=1)


def soft_label_change_rate(det: ModelMutation, obs: Observation, mutants: int, temperature: float) -> torch.Tensor:
    """The mean over the detector's first `mutants` mutants of a soft label change, sigmoid of the best other
    logit minus the logit of the model's own label, over `temperature`."""
    logits = det.mutant_logits(det.inputs_of(obs), range(min(mutants, det.config.max_mutants))).double()  # (M, N, K)
    base = obs.logits.argmax(dim=1).detach()
    own = logits.gather(2, base.view(1, -1, 1).expand(logits.shape[0], -1, 1)).squeeze(2)
    other = logits.scatter(2, base.view(1, -1, 1).expand(logits.shape[0], -1, 1), float("-inf")).amax(dim=2)
    return torch.sigmoid((other - own) / temperature).mean(dim=0)


def mutation_score(det: ModelMutation, config: SurrogateConfig) -> MemberScore:
    """The soft label-change rate (suspicious high), or one minus it (suspicious low)."""

    def score(obs: Observation) -> torch.Tensor:
        lcr = soft_label_change_rate(det, obs, config.mutants, config.temperature)
        return lcr if det.config.suspicious == "high" else 1.0 - lcr

    return score


#: the detector classes (and their subclasses) that have a differentiable surrogate
SURROGATE_TYPES = (Mahalanobis, KDBU, LID, MSP, ModelMutation)


def has_surrogate(detector_class: type) -> bool:
    """Whether detectors of this class have a differentiable surrogate (`surrogate_for`)."""
    return issubclass(detector_class, SURROGATE_TYPES)


def surrogate_for(det: Detector, config: SurrogateConfig = SurrogateConfig()) -> MemberScore:
    """The differentiable surrogate of a fitted detector's score; `ConfigError` for a detector without one."""
    det.check_fitted()
    if isinstance(det, Mahalanobis):
        return mahalanobis_score(det)
    if isinstance(det, KDBU):
        return kd_score(det)
    if isinstance(det, LID):
        return lid_score(det)
    if isinstance(det, MSP):
        return msp_score(det)
    if isinstance(det, ModelMutation):
        return mutation_score(det, config)
    raise ConfigError(f"detector {det.name!r} has no differentiable surrogate; adaptive attacks support "
                      "mahalanobis, mahalanobis_penultimate, kd_bu, lid, msp and the mutation detectors")


class SmoothPValue:
    """-ln of a smooth, monotone version of the guard's tail p-value of a detector's score against its clean
    calibration scores (see the module's docstring)."""

    def __init__(self, calibration: np.ndarray, smoothing: float = 1.0) -> None:
        cal = np.asarray(calibration, dtype=np.float64)
        if cal.size < 2:
            raise InputError(f"{cal.size} calibration scores; a smooth p-value needs at least 2")
        self.calibration = torch.from_numpy(np.sort(cal))
        spread = float(np.std(cal))
        self.bandwidth = smoothing * 1.06 * (spread if spread > 0 else 1.0) * cal.size ** -0.2
        self.tail = tail_parameters(cal)

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        """-ln p~ of each score (float64)."""
        s = scores.to(torch.float64)
        cal = self.calibration.to(s.device)
        n = cal.numel()
        beyond = torch.sigmoid((cal.unsqueeze(0) - s.unsqueeze(1)) / self.bandwidth).sum(dim=1)
        neg_log = -torch.log((1.0 + beyond) / (n + 1.0))
        if self.tail is None:
            return neg_log
        k, u, scale = self.tail
        tail = -float(np.log((k + 1.0) / (n + 1.0))) + (s - u) / scale
        return torch.where(s > u, torch.maximum(neg_log, tail), neg_log)


class GuardEvidence:
    """The differentiable evidence of a fitted guard: smooth Fisher statistic minus the guard's threshold
    (positive: the guard would flag). Call it on a batch on the model's device."""

    def __init__(self, guard: Guard, config: SurrogateConfig = SurrogateConfig()) -> None:
        guard.check_fitted()
        if len(guard.detectors) > 1 and guard.config.combination != "fisher":
            raise ConfigError(f"the guard combines its members by {guard.config.combination!r}; its differentiable "
                              "evidence follows Fisher's rule only (a one-member guard flags the same under every "
                              "rule)")
        self.guard = guard
        self.config = config
        self.members = {name: surrogate_for(det, config) for name, det in guard.detectors.items()}
        self.pvalues = {name: SmoothPValue(guard.calibration_scores_[name], config.smoothing)
                        for name in guard.detectors}
        self.layers = list(guard.probe.layers)
        self.threshold = float(guard.threshold_.value)

    def trace(self, x: torch.Tensor) -> Observation:
        """The forward pass every member reads, with autograd's graph kept."""
        return trace(self.guard.model, x, self.layers)

    def scores(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each member's surrogate score of `x` (differentiable)."""
        obs = self.trace(x)
        return {name: score(obs) for name, score in self.members.items()}

    def statistic(self, x: torch.Tensor) -> torch.Tensor:
        """The smooth Fisher statistic sum_d -2 ln p~_d (differentiable)."""
        scores = self.scores(x)
        return sum(2.0 * self.pvalues[name](s) for name, s in scores.items())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (self.statistic(x) - self.threshold).to(x.dtype)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (nan when either side is constant)."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def surrogate_scores(evidence: GuardEvidence, x: torch.Tensor, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Each member's surrogate score and the smooth Fisher statistic ("guard") of `x`, as float64 arrays."""
    device = model_device(evidence.guard.model)
    parts: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            xb = x[start:start + batch_size].to(device)
            scores = evidence.scores(xb)
            stat = sum(2.0 * evidence.pvalues[n](s) for n, s in scores.items())
            for name, s in {**scores, "guard": stat}.items():
                parts.setdefault(name, []).append(s.detach().double().cpu().numpy())
    return {name: np.concatenate(p) for name, p in parts.items()}


def rank_agreement(evidence: GuardEvidence, x: torch.Tensor) -> dict[str, float]:
    """Spearman correlation, over the inputs `x`, between each member's surrogate score and its real score, and
    between the smooth Fisher statistic and the guard's score ("guard")."""
    real = evidence.guard.screen(x)
    mine = surrogate_scores(evidence, x)
    out = {name: spearman(mine[name], real.scores[name]) for name in evidence.members}
    out["guard"] = spearman(mine["guard"], real.guard_score)
    return out


def float64_copy(guard: Guard) -> Guard:
    """A deep copy of the fitted guard whose model computes in float64 (for numerical gradient checks); every
    detector rebuilds its derived helpers from its state (the mutants are drawn again from the float64 weights)."""
    twin = copy.deepcopy(guard)
    twin.model.double()
    for det in twin.detectors.values():
        det._after_restore()
    return twin


def gradient_check(guard: Guard, x: torch.Tensor, config: SurrogateConfig = SurrogateConfig(),
                   members: bool = True) -> dict[str, bool]:
    """`torch.autograd.gradcheck` in float64 of the guard's evidence and (with `members`) of each member's
    surrogate score, on the inputs `x` (keep them few: one numerical derivative per pixel)."""
    twin = float64_copy(guard)
    evidence = GuardEvidence(twin, config)
    xd = x.detach().to(torch.float64).to(model_device(twin.model)).requires_grad_(True)
    checks: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"guard": evidence}
    if members:
        for name, score in evidence.members.items():
            checks[name] = lambda inputs, _score=score: _score(evidence.trace(inputs))
    return {name: bool(torch.autograd.gradcheck(fn, (xd,), eps=1e-6, atol=1e-5, rtol=1e-3, raise_exception=False))
            for name, fn in checks.items()}


__all__ = [
    "Evidence", "GuardEvidence", "SURROGATE_TYPES", "SmoothPValue", "SurrogateConfig", "gradient_check",
    "has_surrogate", "rank_agreement",
    "spearman", "surrogate_for", "surrogate_scores",
]
