"""The Guard: detectors fitted together on clean data, calibrated as a whole, giving verdicts.

`Guard(model, GuardConfig(...)).fit(clean_x, clean_y)` splits the clean inputs into a fit part and a
held-out calibration part, runs ONE probe pass per part, fits every detector on the first and records
its scores on the second. A new input's score under each detector becomes a p-value against those
clean scores (conformal, with an exponential tail beyond the top clean scores: `malex.guard.pvalues`);
the guard's own score combines them (Fisher's -2 sum(ln p) by default; the Cauchy combination, the harmonic-mean
p-value or min-p by `GuardConfig.combination`: `malex.guard.combine`), thresholded so that at most `fpr` of the
clean calibration inputs, each scored against the others, are flagged. Fisher's sum lets several
detectors' moderate evidence add up, where the smallest p-value alone (measured in
benchmarks/digits_suite.py) lost most single detectors' power.

The verdict type follows the study's observation, never knowledge of the attack: backdoor inputs are
robust (low label-change rate under strong mutation, confident blends) and adversarial inputs are
sensitive (high label-change rate under mild mutation). Each detector class declares which kind its
evidence points to (`Detector.evidence`); a flagged input is called the kind whose detectors give the
stronger evidence (smaller p-value); detectors of no kind (feature-space anomalies) flag but do not type.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from malex.data.dataset import split_keeping_groups
from malex.data.validate import to_labels, to_nchw_float
from malex.detectors import Detector, make_detector
from malex.detectors.base import ADVERSARIAL, BACKDOOR  # noqa: F401 (BACKDOOR: re-exported by malex.guard)
from malex.detectors.fitting import fit_detectors, joint_probe, score_detectors
from malex.calibration import DEFAULT_FPR, Threshold, calibrate, check_fpr
from malex.errors import ConfigError, ModelFileError, NotFittedError
from malex.guard.fingerprint import model_fingerprint
from malex.guard.combine import DEFAULT_COMBINATION, check_combination, make_combination
from malex.guard.kind_model import KindModel, fit_kind_model
from malex.guard.stand_ins import StandInConfig, adversarial_stand_ins, backdoor_stand_ins
from malex.guard.verdict import BENIGN, evidence_kinds, verdicts
from malex.guard.io import GuardFile, malformed, read_guard_file, write_guard_file
from malex.guard.pvalues import in_sample_tail_pvalues, tail_pvalues
from malex.models.anatomy import input_channels
from malex.models.inference import predict
from malex.probe import Observation

#: fewest clean calibration inputs beyond the threshold for which the guard does not warn
MIN_BEYOND = 5
#: calibration inputs probed and scored at a time (only their scores are kept)
CALIBRATION_CHUNK = 4096
#: how a flagged input is typed: by the two evidence groups' smaller p-value, or by a learned model
EVIDENCE, LEARNED = "evidence", "learned"
TYPINGS = (EVIDENCE, LEARNED)
#: fewest self-made flagged examples of each kind for the learned typing to fit on flagged ones only
MIN_FLAGGED = 20


@dataclass(frozen=True)
class GuardConfig:
    """Which detectors (registry names, with optional settings), the target FPR and the clean split.

    `calibration_fraction` of the clean inputs calibrate the guard, the rest fit the detectors, but at most
    `max_fit` of them (None: no cap): the inputs beyond it calibrate too. Every detector's fitted state is
    bounded well below that (reference samples of at most 2,000 inputs, streamed moments), while the
    guard's false-positive control gains from every calibration input, and calibration is scored in chunks
    (only scores kept), so the memory a fit needs stops growing at `max_fit` fit inputs. `combination` names the
    rule that turns the detectors' p-values into the guard score (`malex.guard.combine.COMBINATIONS`: fisher,
    cauchy, hmp, min_p); the threshold is calibrated on that score whatever the rule. `typing` names how a flagged
    input gets its kind: "evidence" (the smaller p-value of the adversarial and the backdoor detector groups) or
    "learned" (a logistic regression on every detector's p-value, fitted on adversarial examples and universal
    triggers the guard makes itself at fit time: `malex.guard.kind_model`, settings `typing_settings` as the fields
    of `malex.guard.stand_ins.StandInConfig`)."""

    def stand_in_config(self) -> StandInConfig:
        """The settings of the examples a learned typing is fitted on."""
        settings = dict(self.typing_settings)
        if "pgd_eps" in settings:
            settings["pgd_eps"] = tuple(settings["pgd_eps"])
        try:
            return StandInConfig(**settings)
        except TypeError as exc:
            raise ConfigError(f"typing_settings {self.typing_settings!r}: {exc}") from exc

    detectors: tuple[str, ...] = ("mutation_adv", "mutation_bd", "kd_bu", "mahalanobis")
    settings: dict[str, dict] = field(default_factory=dict)
    fpr: float = DEFAULT_FPR
    calibration_fraction: float = 0.4
    max_fit: int | None = 10_000
    seed: int = 0
    batch_size: int = 256
    progress: bool = True
    combination: str = DEFAULT_COMBINATION
    typing: str = EVIDENCE
    typing_settings: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.detectors:
            raise ConfigError("a guard needs at least one detector")
        if len(set(self.detectors)) != len(self.detectors):
            raise ConfigError(f"detectors {self.detectors} name one detector twice")
        check_fpr(self.fpr, "fpr")
        check_combination(self.combination)
        if self.typing not in TYPINGS:
            raise ConfigError(f"typing is {self.typing!r}; expected one of {', '.join(TYPINGS)}")
        if not isinstance(self.typing_settings, dict):
            raise ConfigError(f"typing_settings are {self.typing_settings!r}; expected a dict of StandInConfig fields")
        self.stand_in_config()  # checks the settings
        if not 0 < self.calibration_fraction < 1:
            raise ConfigError(f"calibration_fraction is {self.calibration_fraction}; expected a value in (0, 1)")
        if self.max_fit is not None and (isinstance(self.max_fit, bool) or not isinstance(self.max_fit, int)
                                         or self.max_fit < 10):
            raise ConfigError(f"max_fit is {self.max_fit!r}; expected None or an int >= 10")
        for name, least in (("batch_size", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"{name} is {value!r}; expected an int >= {least}")
        if not isinstance(self.settings, dict) or not all(isinstance(v, dict) for v in self.settings.values()):
            raise ConfigError(f"settings are {self.settings!r}; expected detector name -> dict of settings")
        unknown = set(self.settings) - set(self.detectors)
        if unknown:
            raise ConfigError(f"settings given for detectors not in the guard: {', '.join(sorted(unknown))}")


@dataclass(frozen=True)
class Screening:
    """The guard's answer for a batch: per input, prediction, verdict, guard score and detector scores."""

    prediction: np.ndarray
    verdict: list[str]
    guard_score: np.ndarray
    scores: dict[str, np.ndarray]
    pvalues: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.verdict)

    @property
    def flagged(self) -> np.ndarray:
        return np.array([v != BENIGN for v in self.verdict])

    def rows(self) -> list[dict]:
        """One plain dict per input (for CSV / JSON lines)."""
        return [
            {"index": i, "prediction": int(self.prediction[i]), "verdict": self.verdict[i],
             "guard_score": float(self.guard_score[i]), **{k: float(v[i]) for k, v in self.scores.items()}}
            for i in range(len(self))
        ]


def combine_pvalues(pvalues: dict[str, np.ndarray], rule: str = DEFAULT_COMBINATION) -> np.ndarray:
    """The guard score under the combination `rule` (`malex.guard.combine`; Fisher's -2 sum(ln p) by default),
    higher = more suspicious. p-values are floored at the smallest normal float, so a score far beyond every
    clean one (whose tail p-value underflows to 0) counts as very suspicious, not as infinite."""
    return make_combination(rule)(pvalues)


def in_sample_guard_scores(calibration: dict[str, np.ndarray], rule: str = DEFAULT_COMBINATION) -> np.ndarray:
    """The guard score of each clean calibration input, scored against the other calibration inputs
    (so that it matches what a new clean input gets)."""
    return combine_pvalues({k: in_sample_tail_pvalues(v) for k, v in calibration.items()}, rule)


def calibrate_guard(calibration: dict[str, np.ndarray], fpr: float, rule: str = DEFAULT_COMBINATION) -> Threshold:
    """The guard-score threshold that flags at most `fpr` of the clean calibration inputs."""
    return calibrate(in_sample_guard_scores(calibration, rule), fpr)


def fit_calibration_split(labels: torch.Tensor, groups: torch.Tensor | None, calibration_fraction: float,
                          max_fit: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, calibration) indices: stratified by label, whole groups on one side when `groups` is given, and
    at most `max_fit` fit inputs (a seeded random share of the fit side, whole groups, calibrates instead)."""
    fit_idx, cal_idx = split_keeping_groups(labels, groups, (1 - calibration_fraction, calibration_fraction), seed,
                                            part_names=("the guard's fit part", "its calibration part"))
    if max_fit is None or len(fit_idx) <= max_fit:
        return fit_idx, cal_idx
    gen = torch.Generator().manual_seed(seed)
    if groups is None:
        order, keep = torch.randperm(len(fit_idx), generator=gen), max_fit
    else:  # groups in a seeded random order, as many whole ones as fit under the cap
        _, local = torch.unique(groups[fit_idx], return_inverse=True)
        rank = torch.randperm(int(local.max()) + 1, generator=gen)[local]  # each input's group's place
        order = torch.argsort(rank, stable=True)
        whole = int((torch.bincount(rank).cumsum(0) <= max_fit).sum())  # groups that fit entirely
        keep = int((rank < whole).sum())
    return fit_idx[order[:keep]], torch.cat([cal_idx, fit_idx[order[keep:]]])


class Guard:
    """Screen a model's inputs with several detectors under one calibrated false-positive rate."""

    def __init__(self, model: nn.Module, config: GuardConfig = GuardConfig()) -> None:
        self.model = model
        self.config = config
        self.detectors: dict[str, Detector] = {
            name: make_detector(name, model, **config.settings.get(name, {})) for name in config.detectors
        }
        self.probe = joint_probe(model, self.detectors)
        self.calibration_scores_: dict[str, np.ndarray] | None = None
        self.threshold_: Threshold | None = None
        #: the learned typing (None: the evidence rule), and the seconds its fit took
        self.kind_model_: KindModel | None = None
        #: whether the learned typing's search found a universal trigger that works like a planted one
        self.trigger_found_: bool = False
        self.typing_seconds_: float = 0.0
        #: where the model came from (`malex.models.sources.LoadedModel.description`), saved with the guard
        self.source: dict | None = None

    @property
    def input_shape(self) -> tuple[int, int, int] | None:
        shape = getattr(self.model, "input_shape", None)
        return tuple(shape) if shape is not None else None

    def _inputs(self, x) -> torch.Tensor:
        """`x` as float32 NCHW in [0, 1]: laid out by the model's `input_shape`, or, when it declares none, by its
        first convolution's input channels (NHWC arrays are transposed)."""
        shape = self.input_shape
        channels = input_channels(self.model) if shape is None else None
        return to_nchw_float(x, shape=shape, channels=channels, source="inputs")

    def fit(self, clean_x, clean_y=None, groups=None) -> "Guard":
        """Fit every detector on clean inputs and calibrate the guard on a held-out clean part. `groups`
        (optional, one int per input) marks near-copies, e.g. the frames of one physical sign: a group is
        never split between the fit and the calibration part, which would calibrate on inputs the
        detectors have all but seen and leave new clean inputs above the threshold too often."""
        x = self._inputs(clean_x)
        y = to_labels(clean_y, n=x.shape[0]) if clean_y is not None else None
        if x.shape[0] < 20:
            raise ConfigError(f"{x.shape[0]} clean inputs; a guard needs at least 20 to fit and calibrate")
        labels = y if y is not None else torch.zeros(x.shape[0], dtype=torch.long)
        if groups is not None:
            groups = to_labels(groups, n=x.shape[0])
        frac = self.config.calibration_fraction
        fit_idx, cal_idx = fit_calibration_split(labels, groups, frac, self.config.max_fit, self.config.seed)
        fit_detectors(self.detectors, self.probe, x[fit_idx], y[fit_idx] if y is not None else None,
                      batch_size=self.config.batch_size, progress=self.config.progress)
        # only the scores of the calibration inputs are kept, not their activations (or a copy of them all)
        self.calibration_scores_ = score_detectors(
            self.detectors, self.probe, x, index=cal_idx, batch_size=self.config.batch_size, chunk=CALIBRATION_CHUNK,
            progress=self.config.progress, label="calibrating (chunks)")
        beyond = len(cal_idx) * self.config.fpr
        if beyond < MIN_BEYOND:
            need = (f"give at least {int(np.ceil(MIN_BEYOND / (self.config.fpr * frac)))} clean inputs"
                    if self.config.fpr > 0 else "at 0% FPR the threshold is the largest clean calibration score")
            warnings.warn(
                f"{len(cal_idx)} clean calibration inputs put only {beyond:.1f} of them beyond the threshold at "
                f"{self.config.fpr:.1%} FPR, so the false-positive rate a new clean input meets is uncertain; {need}",
                stacklevel=2,
            )
        self.threshold_ = calibrate_guard(self.calibration_scores_, self.config.fpr, self.config.combination)
        if self.config.typing == LEARNED:
            self.fit_typing(x[fit_idx])
        return self

    def fit_typing(self, clean_x: torch.Tensor) -> KindModel | None:
        """Fit the learned typing on the examples the guard makes from `clean_x` (`malex.guard.stand_ins`) and
        flags. With fewer than MIN_FLAGGED flagged examples of either kind (a model in which no universal trigger
        works as a planted one does gives no backdoor-like examples) the guard keeps the evidence rule
        (`kind_model_` None) and says so in `describe()`. A guard configured with the evidence rule becomes a
        learned-typing guard (its config says so, and a saved file keeps the typing)."""
        start = time.perf_counter()
        self.config = replace(self.config, typing=LEARNED)
        config = self.config.stand_in_config()
        gen = torch.Generator().manual_seed(self.config.seed)
        x = clean_x[torch.randperm(len(clean_x), generator=gen)[:config.n_inputs]]
        predicted = predict(self.model, x)
        made = {"adversarial": adversarial_stand_ins(self.model, x, predicted, config, self.config.seed),
                "backdoor": backdoor_stand_ins(self.model, x, predicted, config, self.config.seed)}
        evidence = {}
        for kind, examples in made.items():
            examples = examples[torch.randperm(len(examples), generator=gen)[:4 * config.n_inputs]]
            if len(examples):
                screened = self.screen_observation(self.probe.run(examples, self.config.batch_size))
                evidence[kind] = (screened.pvalues, screened.flagged)
            else:
                evidence[kind] = ({n: np.ones(0) for n in self.detectors}, np.zeros(0, bool))
        self.typing_seconds_ = time.perf_counter() - start
        self.trigger_found_ = len(made["backdoor"]) > 0
        if any(int(flags.sum()) < MIN_FLAGGED for _, flags in evidence.values()):
            # no universal trigger that works like a planted one, or too few flagged examples: the evidence rule
            self.kind_model_ = None
            return None
        evidence = {k: {n: p[flags] for n, p in pv.items()} for k, (pv, flags) in evidence.items()}
        self.kind_model_ = fit_kind_model(evidence["adversarial"], evidence["backdoor"], tuple(self.detectors))
        self.typing_seconds_ = time.perf_counter() - start
        return self.kind_model_

    def check_fitted(self) -> None:
        """Raise `NotFittedError` unless the guard was fitted or loaded."""
        if self.calibration_scores_ is None or self.threshold_ is None:
            raise NotFittedError("the guard is not fitted; call fit() on clean inputs or Guard.load() a saved one")

    def member(self, name: str) -> "Guard":
        """The fitted member `name` alone as a one-detector guard: the same fitted detector and clean calibration
        scores, its own threshold at the same FPR (what fitting that guard alone on the same inputs and seed
        gives, without fitting the detector again). Fisher's rule: with one p-value every rule flags the same."""
        self.check_fitted()
        if name not in self.detectors:
            raise ConfigError(f"the guard has no member {name!r}; expected one of {', '.join(self.detectors)}")
        settings = {k: v for k, v in self.config.settings.items() if k == name}
        alone = Guard(self.model, replace(self.config, detectors=(name,), settings=settings, progress=False,
                                          combination=DEFAULT_COMBINATION, typing=EVIDENCE, typing_settings={}))
        alone.detectors = {name: self.detectors[name]}
        alone.probe = joint_probe(self.model, alone.detectors)
        alone.calibration_scores_ = {name: self.calibration_scores_[name]}
        alone.threshold_ = calibrate_guard(alone.calibration_scores_, self.config.fpr)
        return alone

    def _pvalues(self, scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: tail_pvalues(self.calibration_scores_[k], v) for k, v in scores.items()}

    def _kind(self, pvalues: dict[str, np.ndarray]) -> np.ndarray:
        """ADVERSARIAL or BACKDOOR per input: the learned typing's, or the evidence rule's (the detectors whose
        evidence has a kind)."""
        if self.config.typing == LEARNED:
            settings = self.config.stand_in_config()
            if self.kind_model_ is not None and settings.with_trigger == LEARNED:
                return self.kind_model_.kinds(pvalues)
            if not self.trigger_found_ and settings.no_trigger == ADVERSARIAL:
                return np.full(len(next(iter(pvalues.values()))), ADVERSARIAL)  # no sign of a backdoor in the model
        return evidence_kinds(pvalues, {name: det.evidence for name, det in self.detectors.items()})

    def screen_observation(self, obs: Observation) -> Screening:
        """Screen inputs already seen by this guard's probe."""
        self.check_fitted()
        scores = {name: det.score(obs) for name, det in self.detectors.items()}
        pvalues = self._pvalues(scores)
        guard_score = combine_pvalues(pvalues, self.config.combination)
        flagged = self.threshold_.flags(guard_score)
        verdict = verdicts(flagged, self._kind(pvalues))
        return Screening(obs.pred.numpy(), verdict, guard_score, scores, pvalues)

    def observe(self, x) -> Observation:
        """One probe pass over `x` (laid out and checked as every input the guard takes)."""
        return self.probe.run(self._inputs(x), self.config.batch_size)

    def screen(self, x) -> Screening:
        """One probe pass over `x`, then every detector's score, the guard score and a verdict per input."""
        self.check_fitted()
        return self.screen_observation(self.observe(x))

    def save(self, path: str | Path, overwrite: bool = False, key: bytes | None = None) -> Path:
        """Write the fitted guard to one safetensors file (no pickle; `malex.guard.io`), signed with `key` when
        one is given (`malex.guard.signing.guard_key`), with `self.source` when set; refuses to replace an
        existing file unless `overwrite`."""
        self.check_fitted()
        config = asdict(self.config)
        config.pop("progress")
        contents = GuardFile(
            fingerprint=model_fingerprint(self.model), config=config, threshold=asdict(self.threshold_),
            detectors={name: det.export() for name, det in self.detectors.items()},
            calibration=self.calibration_scores_, source=self.source,
            typing=self._typing_tensors(),
        )
        return write_guard_file(path, contents, overwrite=overwrite, key=key)

    def _typing_tensors(self) -> dict[str, torch.Tensor]:
        """What a learned typing saves: its model's arrays (or a mark that it has none) and the search's outcome."""
        if self.config.typing != LEARNED:
            return {}
        tensors = (self.kind_model_.export() if self.kind_model_ is not None else
                   {"evidence_rule": torch.ones(1, dtype=torch.float64)})
        return {**tensors, "trigger_found": torch.tensor([float(self.trigger_found_)], dtype=torch.float64)}

    @classmethod
    def load(cls, path: str | Path, model: nn.Module, key: bytes | None = None) -> "Guard":
        """Load a guard saved by `save`, in front of `model`: refused (`ModelFileError`, one line) if the model
        differs, if any setting, threshold or detector state is out of range or does not fit the model, or,
        given a `key`, if the file was not signed with it."""
        path = Path(path)
        saved = read_guard_file(path, model_fingerprint(model), key)
        try:
            config = GuardConfig(**{**saved.config, "detectors": tuple(saved.config["detectors"]), "progress": False})
            guard = cls(model, config)
            for name, det in guard.detectors.items():
                det.restore(*saved.detectors[name])
            guard.calibration_scores_ = dict(saved.calibration)
            guard.threshold_ = _threshold(saved.threshold)
            if config.typing == LEARNED and "evidence_rule" not in saved.typing:
                guard.kind_model_ = KindModel.restore(tuple(guard.detectors), saved.typing)
            found = saved.typing.get("trigger_found")
            guard.trigger_found_ = bool(found[0] > 0) if found is not None else guard.kind_model_ is not None
            guard.source = saved.source
        except (KeyError, TypeError, ConfigError, ModelFileError, NotFittedError) as exc:
            raise malformed(path, exc) from exc
        guard._check_restored(path)
        return guard

    def _check_restored(self, path: Path) -> None:
        """Score one blank input with every restored detector: a state that does not fit the model (a tensor
        of the wrong shape, a value of the wrong type) is a `ModelFileError` now, not an error when screening."""
        if self.input_shape is None:
            return
        obs = self.probe.run(torch.zeros((1, *self.input_shape)), batch_size=1)
        for name, det in self.detectors.items():
            try:
                scores = np.asarray(det.score(obs), dtype=np.float64)
            except (RuntimeError, ValueError, IndexError, TypeError, KeyError, AttributeError) as exc:
                raise ModelFileError(f"{path}: detector {name}'s saved state does not fit the model "
                                     f"({' '.join(str(exc).split())})") from exc
            if scores.shape != (1,):
                raise ModelFileError(f"{path}: detector {name}'s saved state gives scores of shape {scores.shape} "
                                     "for one input; expected one score per input")

    def describe(self) -> dict:
        """Detectors, target FPR and calibration facts, JSON-able."""
        self.check_fitted()
        return {
            "detectors": list(self.detectors),
            "fpr": self.config.fpr,
            "threshold": self.threshold_.value,
            "combination": self.config.combination,
            "typing": self.config.typing if self.kind_model_ is not None or self.config.typing == EVIDENCE else
            "learned: no backdoor-like examples, so the evidence rule",
            "calibration_fpr": float(self.threshold_.flags(
                in_sample_guard_scores(self.calibration_scores_, self.config.combination)).mean()),
            "n_calibration": int(len(next(iter(self.calibration_scores_.values())))),
            "max_fit": self.config.max_fit,
            "states": {k: d.state() for k, d in self.detectors.items()},
        }


def _threshold(saved: dict) -> Threshold:
    """The saved threshold, checked: a finite value and a target FPR in [0, 1)."""
    value = saved["value"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise ConfigError(f"threshold value {value!r}; expected a finite number")
    return Threshold(float(value), check_fpr(saved["fpr"], "threshold fpr"))


def detectors_from(names: Sequence[str] | str) -> tuple[str, ...]:
    """Parse 'a,b,c' or a sequence into a tuple of detector names."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    return tuple(names)


def save_guard(guard: Guard, path: str | Path, overwrite: bool = False, key: bytes | None = None) -> Path:
    """`guard.save(path, overwrite, key)`."""
    return guard.save(path, overwrite=overwrite, key=key)


def load_guard(path: str | Path, model: nn.Module, key: bytes | None = None) -> Guard:
    """`Guard.load(path, model, key)`."""
    return Guard.load(path, model, key=key)
