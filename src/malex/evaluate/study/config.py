"""The study's configuration: a small TOML file parsed into frozen dataclasses.

Layout of the file (every table but `[datasets.*]` is optional; see configs/digits.toml):

    [study]                 seeds, fpr, n_clean, n_malicious, n_fit, n_calibration, detectors, guard (default:
                            the guard's own default detectors), guard_combination, guard_typing,
                            guard_typing_settings (default: as shipped), device, batch_size, data_dir,
                            asr_floor (default 0.85: a backdoor seed whose poisoned model's ASR is below it is
                            marked "attack not learnt" in the tables and left out of their means)
    [detectors.NAME]        settings of a detector of the registry (passed to make_detector)
    [backdoors.NAME]        trigger = registry name (default NAME); poison_rate (default: the dataset's);
                            fine_tune (a table of TrainConfig fields: the poisoned model is the seed's clean
                            model trained further on the poisoned data, with the dataset's training settings
                            overridden by these; default: trained from scratch); the other keys are the
                            trigger's settings
    [adversarial.NAME]      attack = registry name (default NAME); targeted = true attacks every source toward
                            each other class (the study's CW); the other keys are the attack's settings. An
                            adaptive attack (adaptive_pgd, orthogonal_pgd, feature_matching) also takes
                            budget_scale, targets and n_sources (adaptive_config.py)
    [analysis]              enabled, seed, n, strengths, mutants, embedding, layers
    [datasets.NAME]         data (a dataset name or an .npz path; default NAME), arch (a registered name, or
                            module:callable with arch_kwargs and the value_range, mean and std its network
                            expects), poison_rate, target,
                            attacks (default: every backdoor and adversarial attack), and per-dataset
                            overrides of n_clean, n_malicious, n_fit, n_calibration, detectors, guard and the
                            guard_* decision keys
    [datasets.NAME.train]              TrainConfig fields (the seed is the study's seed)
    [datasets.NAME.attack_settings.A]  per-dataset overrides of attack A's settings
    [datasets.NAME.detector_settings.D] per-dataset overrides of detector D's settings

An unknown key or a value of the wrong type or range raises `ConfigError` naming the key (its dotted path).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from malex.calibration import DEFAULT_FPR, check_fpr
from malex.errors import ConfigError
from malex.models.preprocess import Preprocessing
from malex.models.trainable import Trainable
from malex.evaluate.study.adaptive_config import AdaptiveSpec, check_targets, is_adaptive, parse_adaptive
from malex.evaluate.study.fields import (
    as_settings, check_keys, check_name, config_fields, read_bool, read_float, read_int, read_names, read_str,
    read_table,
)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

BACKDOOR, ADVERSARIAL = "backdoor", "adversarial"
#: the model key of the clean model (a backdoor's poisoned model is keyed by the backdoor's name)
CLEAN_MODEL = "clean"
#: the row name of the guard in every cell
GUARD = "guard"
#: the attack success rate a poisoned model must reach for its backdoor to count as learnt (study.asr_floor)
ASR_FLOOR = 0.85
_EMBEDDINGS = ("pca", "tsne")


@dataclass(frozen=True)
class AttackSpec:
    """One attack of the grid: a backdoor (a trigger, poisoned training) or an adversarial attack."""

    name: str
    kind: str  # BACKDOOR or ADVERSARIAL
    method: str  # trigger or adversarial attack registry name
    settings: dict[str, Any] = field(default_factory=dict)
    targeted: bool = False  # adversarial: toward each other class from every source
    poison_rate: float | None = None  # backdoor: overrides the dataset's poisoning rate
    #: backdoor: TrainConfig fields of a poisoned fine-tuning of the seed's clean model (None: from scratch)
    fine_tune: dict[str, Any] | None = None

    @property
    def model_key(self) -> str:
        """The model this attack is evaluated on: its own poisoned model, or the clean one."""
        return self.name if self.kind == BACKDOOR else CLEAN_MODEL

    def describe(self) -> dict[str, Any]:
        """The attack's record (fine_tune only when set, so records made before it existed still match)."""
        record = dataclasses.asdict(self)
        if self.fine_tune is None:
            del record["fine_tune"]
        return record


@dataclass(frozen=True)
class GuardDecision:
    """How the study's guard combines and types: `GuardConfig.combination`, `.typing` and `.typing_settings`."""

    combination: str = "fisher"
    typing: str = "evidence"
    typing_settings: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """The settings that differ from the shipped guard's (nothing for the default, as records always held)."""
        default = GuardDecision()
        return {k: v for k, v in dataclasses.asdict(self).items() if v != getattr(default, k)}


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the grid does on one dataset."""

    name: str
    data: str
    network: Trainable
    train: dict[str, Any]
    poison_rate: float
    target: int
    attacks: tuple[AttackSpec, ...]
    detectors: tuple[str, ...]
    detector_settings: dict[str, dict[str, Any]]
    guard: tuple[str, ...]
    n_clean: int
    n_malicious: int
    n_fit: int
    n_calibration: int
    #: how the guard decides (GuardConfig's combination, typing and typing_settings; defaults: as shipped)
    guard_decision: GuardDecision = field(default_factory=lambda: GuardDecision())
    #: the adaptive attacks, run on the clean model against its guard (not grid cells: adaptive.py)
    adaptive: tuple[AdaptiveSpec, ...] = ()

    @property
    def arch(self) -> str:
        """The architecture's registered name, or its factory module:callable."""
        return self.network.arch

    @property
    def model_keys(self) -> tuple[str, ...]:
        """The clean model (when an adversarial attack needs it), then one poisoned model per backdoor."""
        keys = [CLEAN_MODEL] if any(a.kind == ADVERSARIAL for a in self.attacks) or self.adaptive else []
        return tuple(keys + [a.name for a in self.attacks if a.kind == BACKDOOR])

    def attack(self, name: str) -> AttackSpec:
        for a in self.attacks:
            if a.name == name:
                return a
        raise ConfigError(f"dataset {self.name!r} has no attack {name!r}")

    def backdoor_of(self, model_key: str) -> AttackSpec | None:
        """The backdoor a model was poisoned with (None for the clean model)."""
        return None if model_key == CLEAN_MODEL else self.attack(model_key)

    def attacks_on(self, model_key: str) -> tuple[AttackSpec, ...]:
        return tuple(a for a in self.attacks if a.model_key == model_key)

    def fine_tuned(self, model_key: str) -> bool:
        """Whether `model_key`'s model is the clean model fine-tuned on poisoned data."""
        backdoor = self.backdoor_of(model_key)
        return backdoor is not None and backdoor.fine_tune is not None

    def rate_of(self, backdoor: AttackSpec) -> float:
        """The poisoning rate of a backdoor: its own, else the dataset's."""
        return self.poison_rate if backdoor.poison_rate is None else backdoor.poison_rate


@dataclass(frozen=True)
class AnalysisConfig:
    """The three-space analysis drawn in the report, on one seed's models."""

    enabled: bool = True
    seed: int | None = None  # None: the study's first seed
    n: int = 200  # inputs per kind
    strengths: tuple[float, ...] = (0.1, 0.3, 0.65, 1.0)
    mutants: int = 50
    embedding: str = "pca"
    layers: tuple[str, ...] = ()  # () = the model's probe layers


@dataclass(frozen=True)
class StudyConfig:
    """A parsed study: the grid datasets x attacks x detectors x seeds and how each cell is measured."""

    datasets: tuple[DatasetSpec, ...]
    seeds: tuple[int, ...]
    fpr: float = DEFAULT_FPR
    device: str = "cpu"
    batch_size: int = 256
    data_dir: str | None = None
    analysis: AnalysisConfig = AnalysisConfig()
    #: a backdoor's seeds below this ASR are "attack not learnt" in the tables (no artifact depends on it)
    asr_floor: float = ASR_FLOOR
    #: the mapping this config was parsed from and the folder relative paths resolved against (for the record)
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    base_dir: str | None = None

    @property
    def analysis_seed(self) -> int:
        return self.seeds[0] if self.analysis.seed is None else self.analysis.seed

    def dataset(self, name: str) -> DatasetSpec:
        for d in self.datasets:
            if d.name == name:
                return d
        raise ConfigError(f"the study has no dataset {name!r}")


# --- sections ---------------------------------------------------------------------------------------------

def _backdoor(name: str, table: dict[str, Any], where: str) -> AttackSpec:
    from malex.attacks.backdoor import TRIGGERS, make_trigger

    method = read_str(table, "trigger", where, name)
    if method not in TRIGGERS:
        raise ConfigError(f"{where}.trigger: unknown trigger {method!r}; expected one of {', '.join(TRIGGERS)}")
    rate = read_float(table, "poison_rate", where, None, 0.0, 1.0)
    own = ("trigger", "poison_rate", "fine_tune")
    settings = as_settings({k: v for k, v in table.items() if k not in own})
    check_keys(settings, config_fields(TRIGGERS[method].config_type) | set(own), where)
    try:
        make_trigger(method, **settings)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    tune = table.get("fine_tune")
    tune = None if tune is None else _train(read_table(tune, f"{where}.fine_tune"), f"{where}.fine_tune")
    return AttackSpec(name, BACKDOOR, method, settings, poison_rate=rate, fine_tune=tune)


def _check_backdoor_targets(specs: tuple[AttackSpec | AdaptiveSpec, ...], target: int, where: str,
                            overrides: Mapping[str, Any]) -> None:
    """Refuse a backdoor whose trigger cannot aim at the dataset's target (TaCT's source and cover classes)."""
    from malex.attacks.backdoor import make_trigger

    for spec in specs:
        if isinstance(spec, AttackSpec) and spec.kind == BACKDOOR:
            try:
                make_trigger(spec.method, **spec.settings).check_target(target)
            except ConfigError as exc:
                at = f"{where}.attack_settings.{spec.name}" if spec.name in overrides else f"backdoors.{spec.name}"
                raise ConfigError(f"{at} (target {target} of {where}): {exc}") from exc


def _adversarial(name: str, table: dict[str, Any], where: str) -> AttackSpec | AdaptiveSpec:
    from malex.attacks.adversarial import ADVERSARIAL_ATTACKS, make_adversarial

    method = read_str(table, "attack", where, name)
    if method not in ADVERSARIAL_ATTACKS:
        raise ConfigError(f"{where}.attack: unknown adversarial attack {method!r}; expected one of "
                          f"{', '.join(ADVERSARIAL_ATTACKS)}")
    if is_adaptive(method):
        return parse_adaptive(name, method, {k: v for k, v in table.items() if k != "attack"}, where)
    targeted = read_bool(table, "targeted", where, False)
    settings = as_settings({k: v for k, v in table.items() if k not in ("attack", "targeted")})
    check_keys(settings, config_fields(ADVERSARIAL_ATTACKS[method].config_class) | {"attack", "targeted"}, where)
    try:
        make_adversarial(method, **settings)
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    return AttackSpec(name, ADVERSARIAL, method, settings, targeted)


def _with_overrides(spec: AttackSpec | AdaptiveSpec, overrides: dict[str, Any], where: str
                    ) -> AttackSpec | AdaptiveSpec:
    """`spec` with per-dataset settings merged in, re-validated."""
    if isinstance(spec, AdaptiveSpec):
        own = {"budget_scale": list(spec.budget_scale), "targets": list(spec.targets), "n_sources": spec.n_sources}
        return parse_adaptive(spec.name, spec.method, {**spec.settings, **own, **overrides}, where)
    table = {**spec.settings, **overrides}
    if spec.kind == BACKDOOR:
        rate = {} if spec.poison_rate is None else {"poison_rate": spec.poison_rate}
        tune = {} if spec.fine_tune is None else {"fine_tune": spec.fine_tune}
        return _backdoor(spec.name, {"trigger": spec.method, **rate, **tune, **table}, where)
    return _adversarial(spec.name, {"attack": spec.method, "targeted": spec.targeted, **table}, where)


_DECISION_KEYS = {"guard_combination", "guard_typing", "guard_typing_settings"}
_STUDY_KEYS = {"seeds", "fpr", "n_clean", "n_malicious", "n_fit", "n_calibration", "detectors", "guard", "device",
               "batch_size", "data_dir", "asr_floor"} | _DECISION_KEYS
_DATASET_KEYS = {"data", "arch", "arch_kwargs", "value_range", "mean", "std", "poison_rate", "target", "attacks", "detectors", "guard", "n_clean", "n_malicious",
                 "n_fit", "n_calibration", "train", "attack_settings", "detector_settings"} | _DECISION_KEYS
_ANALYSIS_KEYS = {f.name for f in dataclasses.fields(AnalysisConfig)}
_TOP_KEYS = {"study", "detectors", "backdoors", "adversarial", "analysis", "datasets"}
_DEFAULT_DETECTORS = ("msp", "mahalanobis_penultimate", "mutation_adv", "mutation_bd", "mahalanobis")


def _default_guard() -> tuple[str, ...]:
    """The guard's own default detectors (a config without `guard` measures the guard as shipped)."""
    from malex.guard import GuardConfig

    return tuple(GuardConfig().detectors)


def _analysis(table: dict[str, Any]) -> AnalysisConfig:
    where = "analysis"
    check_keys(table, _ANALYSIS_KEYS, where)
    d = AnalysisConfig()
    strengths = table.get("strengths", list(d.strengths))
    if not isinstance(strengths, list) or not strengths or not all(
            isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s > 0 for s in strengths):
        raise ConfigError(f"{where}.strengths: {strengths!r}; expected a non-empty list of numbers > 0")
    layers = table.get("layers", list(d.layers))
    if not isinstance(layers, list) or not all(isinstance(v, str) and v for v in layers):
        raise ConfigError(f"{where}.layers: {layers!r}; expected a list of layer names (empty: the probe layers)")
    return AnalysisConfig(
        enabled=read_bool(table, "enabled", where, d.enabled),
        seed=read_int(table, "seed", where, d.seed),
        n=read_int(table, "n", where, d.n, minimum=10),
        strengths=tuple(float(s) for s in strengths),
        mutants=read_int(table, "mutants", where, d.mutants, minimum=1),
        embedding=read_str(table, "embedding", where, d.embedding, _EMBEDDINGS),
        layers=tuple(layers),
    )


def _train(table: dict[str, Any], where: str) -> dict[str, Any]:
    from malex.models.train import TrainConfig

    allowed = config_fields(TrainConfig) - {"seed"}
    check_keys(table, allowed, where)
    try:
        TrainConfig(**table)
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    return dict(table)


def _check_detectors(network: Trainable, names: list[str], settings: dict[str, dict[str, Any]],
                     study_settings: dict[str, dict[str, Any]], where: str) -> None:
    """Build every detector on an untrained model of a registered architecture (its default input shape), so
    that a bad setting fails now rather than after hours of training. A factory's network is only built once
    its data's shape is known, so its detectors are checked when the study first makes them."""
    import inspect

    from malex.detectors import make_detector
    from malex.models import ARCHITECTURES

    if network.foreign:
        return
    builder = ARCHITECTURES[network.arch].build
    shape = inspect.signature(builder).parameters.get("input_shape")
    if shape is None or shape.default is inspect.Parameter.empty:
        return
    model = builder()
    for name in names:
        try:
            make_detector(name, model, **settings.get(name, {}))
        except ConfigError as exc:
            origin = f"{where}.detector_settings.{name}" if name not in study_settings or \
                settings.get(name) != study_settings[name] else f"detectors.{name}"
            raise ConfigError(f"{origin}: {exc}") from exc


def _decision(table: dict[str, Any], where: str, default: GuardDecision) -> GuardDecision:
    """guard_combination, guard_typing and guard_typing_settings of a [study] or [datasets.NAME] table,
    checked by building the GuardConfig they make."""
    from malex.guard import GuardConfig

    settings = table.get("guard_typing_settings", default.typing_settings)
    decision = GuardDecision(read_str(table, "guard_combination", where, default.combination),
                             read_str(table, "guard_typing", where, default.typing),
                             as_settings(read_table(settings, f"{where}.guard_typing_settings")))
    try:
        GuardConfig(combination=decision.combination, typing=decision.typing,
                    typing_settings=decision.typing_settings).stand_in_config()
    except ConfigError as exc:
        raise ConfigError(f"{where}.guard_*: {exc}") from exc
    return decision


def _network(table: dict[str, Any], where: str, import_factory: bool) -> Trainable:
    """The dataset's architecture: a registered name, or module:callable with arch_kwargs and the
    preprocessing (value_range, mean, std) its network expects; with `import_factory`, the factory is imported
    and called now, so that a missing module or a bad argument fails before any training."""
    from malex.models import ARCHITECTURES
    from malex.models.sources import build_foreign

    arch = read_str(table, "arch", where, None)
    if arch is None:
        raise ConfigError(f"{where}.arch: missing; expected one of {', '.join(ARCHITECTURES)} or module:callable")
    kwargs = read_table(table.get("arch_kwargs", {}), f"{where}.arch_kwargs")
    prep = {k: table[k] for k in ("value_range", "mean", "std") if k in table}
    try:
        network = Trainable(arch, dict(kwargs), Preprocessing(**prep))
        if import_factory and network.foreign:
            build_foreign(network.arch, network.arch_kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where}.arch: {exc}") from exc
    return network


def parse_config(raw: Mapping[str, Any], base_dir: str | Path | None = None, import_factories: bool = True
                 ) -> StudyConfig:
    """A `StudyConfig` from the parsed TOML mapping; relative dataset paths resolve against `base_dir`.
    `import_factories` False skips building what a run would need (a module:callable network's factory), for reading a finished
    study's tables and report from anywhere."""
    from malex.detectors import DETECTORS
    from malex.models import ARCHITECTURES

    raw = read_table(dict(raw), "the config")
    check_keys(raw, _TOP_KEYS, "config")
    study = read_table(raw.get("study", {}), "study")
    check_keys(study, _STUDY_KEYS, "study")

    seeds = study.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"study.seeds: {seeds!r}; expected a non-empty list of distinct integers >= 0")
    fpr = check_fpr(study.get("fpr", DEFAULT_FPR), "study.fpr")
    asr_floor = read_float(study, "asr_floor", "study", ASR_FLOOR, 0.0, 1.0, closed=True)
    counts = {k: read_int(study, k, "study", default, minimum=minimum) for k, default, minimum in
              (("n_clean", 1000, 10), ("n_malicious", 1000, 1), ("n_fit", 2000, 10), ("n_calibration", 1000, 10))}
    detectors = read_names(study, "detectors", "study", _DEFAULT_DETECTORS, DETECTORS, "detector")
    guard = read_names(study, "guard", "study", _default_guard(), DETECTORS, "detector")
    decision = _decision(study, "study", GuardDecision())
    device = read_str(study, "device", "study", "cpu")
    batch_size = read_int(study, "batch_size", "study", 256, minimum=1)
    data_dir = read_str(study, "data_dir", "study", None)
    base = Path(base_dir) if base_dir is not None else None
    if data_dir is not None and base is not None and not Path(data_dir).is_absolute():
        data_dir = str(base / data_dir)

    det_settings: dict[str, dict[str, Any]] = {}
    for name, table in read_table(raw.get("detectors", {}), "detectors").items():
        if name not in DETECTORS:
            raise ConfigError(f"detectors.{name}: unknown detector {name!r}; expected one of {', '.join(DETECTORS)}")
        det_settings[name] = as_settings(read_table(table, f"detectors.{name}"))

    attacks: dict[str, AttackSpec | AdaptiveSpec] = {}
    for section, build in (("backdoors", _backdoor), ("adversarial", _adversarial)):
        for name, table in read_table(raw.get(section, {}), section).items():
            where = f"{section}.{name}"
            check_name(name, where)
            if name in attacks:
                raise ConfigError(f"{where}: the name {name!r} is used by a backdoor and an adversarial attack; "
                                  "expected distinct names")
            if name == CLEAN_MODEL:
                raise ConfigError(f"{where}: {CLEAN_MODEL!r} names the clean model; choose another attack name")
            attacks[name] = build(name, read_table(table, where), where)

    datasets_raw = read_table(raw.get("datasets", {}), "datasets")
    if not datasets_raw:
        raise ConfigError("datasets: no dataset; expected at least one [datasets.NAME] table")
    datasets = []
    for name, table in datasets_raw.items():
        where = f"datasets.{name}"
        check_name(name, where)
        table = read_table(table, where)
        check_keys(table, _DATASET_KEYS, where)
        network = _network(table, where, import_factories)
        data = read_str(table, "data", where, name)
        if base is not None and (data.endswith(".npz") or "/" in data) and not Path(data).is_absolute():
            data = str(base / data)
        chosen = read_names(table, "attacks", where, tuple(attacks), attacks, "attack")
        if not chosen:
            raise ConfigError(f"{where}.attacks: no attack; define [backdoors.NAME] or [adversarial.NAME] tables")
        overrides = read_table(table.get("attack_settings", {}), f"{where}.attack_settings")
        for attack_name in overrides:
            if attack_name not in chosen:
                raise ConfigError(f"{where}.attack_settings.{attack_name}: not an attack of this dataset; expected "
                                  f"one of {', '.join(chosen)}")
        specs = tuple(
            _with_overrides(attacks[a], as_settings(read_table(overrides[a], f"{where}.attack_settings.{a}")),
                            f"{where}.attack_settings.{a}") if a in overrides else attacks[a]
            for a in chosen
        )
        ds_detectors = read_names(table, "detectors", where, detectors, DETECTORS, "detector")
        ds_guard = read_names(table, "guard", where, guard, DETECTORS, "detector")
        ds_settings = {k: dict(v) for k, v in det_settings.items()}
        for det, t in read_table(table.get("detector_settings", {}), f"{where}.detector_settings").items():
            if det not in DETECTORS:
                raise ConfigError(f"{where}.detector_settings.{det}: unknown detector {det!r}; expected one of "
                                  f"{', '.join(DETECTORS)}")
            ds_settings[det] = {**ds_settings.get(det, {}), **as_settings(read_table(t, f"{where}.detector_settings.{det}"))}
        used = set(ds_detectors) | set(ds_guard)
        _check_detectors(network, [d for d in DETECTORS if d in used], ds_settings, det_settings, where)
        ds_decision = _decision(table, where, decision)
        adaptive = tuple(a for a in specs if isinstance(a, AdaptiveSpec))
        for a in adaptive:
            check_targets(a, ds_guard, ds_decision.combination,
                          f"{where}.attack_settings.{a.name}" if a.name in overrides else f"adversarial.{a.name}")
        target = read_int(table, "target", where, 0)
        _check_backdoor_targets(specs, target, where, overrides)
        datasets.append(DatasetSpec(
            name=name, data=data, network=network,
            train=_train(read_table(table.get("train", {}), f"{where}.train"), f"{where}.train"),
            poison_rate=read_float(table, "poison_rate", where, 0.1, 0.0, 1.0),
            target=target,
            attacks=tuple(a for a in specs if not isinstance(a, AdaptiveSpec)),
            detectors=ds_detectors,
            detector_settings={k: v for k, v in ds_settings.items() if k in used},
            guard=ds_guard,
            guard_decision=ds_decision,
            **{k: read_int(table, k, where, v, minimum=1 if k == "n_malicious" else 10) for k, v in counts.items()},
            adaptive=adaptive,
        ))
    return StudyConfig(
        datasets=tuple(datasets), seeds=tuple(seeds), fpr=fpr, device=device, batch_size=batch_size,
        data_dir=data_dir, analysis=_analysis(read_table(raw.get("analysis", {}), "analysis")),
        asr_floor=asr_floor,
        raw=normalise_raw(raw), base_dir=None if base is None else str(base.resolve()),
    )


def normalise_raw(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON-able copy of a parsed TOML mapping (dates and times, which no setting uses, become strings)."""
    return json.loads(json.dumps(raw, default=str))


def load_config(path: str | Path, base_dir: str | Path | None = None) -> StudyConfig:
    """Read and check a study's TOML file; relative paths in it resolve against `base_dir` (default: the
    file's folder)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such study config; expected a TOML file")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc
    try:
        return parse_config(raw, base_dir=path.parent if base_dir is None else base_dir)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
