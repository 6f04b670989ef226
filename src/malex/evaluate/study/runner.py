"""The study's grid: datasets x attacks x detectors x seeds, cached so that a rerun redoes nothing.

A cell is (dataset, attack, seed); it holds one row per detector and one for the guard. Per (dataset,
seed), a clean model is trained for the adversarial attacks and one poisoned model per backdoor; each is
trained once and cached. The protocol of the study, per cell:

* the clean validation split is cut in two (stratified, by the seed): detectors fit on up to `n_fit` inputs
  of one half, and each detector's threshold is set at the target FPR on up to `n_calibration` of the other;
  the guard fits on both halves together (it keeps its own calibration part);
* the test split is cut in two: up to `n_clean` inputs of one half that the cell's model classifies
  correctly are the clean test inputs; the other half gives the attack sources;
* malicious inputs, up to `n_malicious`, successful ones only: for a backdoor, non-target sources with the
  trigger that the poisoned model labels as the target; for an adversarial attack, correctly classified
  sources attacked on the clean model (with `targeted`, toward each other class, as the study's CW);
* metrics: AUROC, TPR at 1% and 5% FPR (threshold-free, on the clean test scores), and at the calibrated
  threshold the clean inputs passed, the malicious inputs caught and the study's detection accuracy; the
  guard's row reads its guard score and its own verdicts.

Fitted detectors (their state, calibration and clean scores) are cached per model, so a new attack only
scores its inputs. Every artifact records the ids of what it was made from (see cache.py): a changed
setting or a damaged file redoes what depends on it, and nothing else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from malex.attacks.adversarial import ADVERSARIAL_ATTACKS, make_adversarial
from malex.attacks.backdoor import PoisonConfig, attack_success_rate, make_trigger, poison_split
from malex.data import load_dataset
from malex.data.dataset import Dataset, Split, split_keeping_groups, stratified_split
from malex.detectors import Detector, make_detector
from malex.calibration import calibrate
from malex.device import select_device
from malex.errors import ConfigError, MalexError, ModelFileError
from malex.metrics import DetectionMetrics, auroc, evaluate_scores, tpr_at_fpr
from malex.evaluate.study.analysis import BENIGN, SpaceData, analyse_model
from malex.evaluate.study.cache import (
    StudyLayout, matches, new_id, normalise, read_json, read_meta, read_tensors, write_json, write_tensors,
)
from malex.evaluate.study.config import (
    BACKDOOR, GUARD, AttackSpec, DatasetSpec, StudyConfig, load_config, parse_config,
)
from malex.models import build_model, load_model, read_description, save_model
from malex.models.inference import accuracy, predict
from malex.models.train import TrainConfig, train_classifier
from malex.probe import Probe
from malex.progress import track

Log = Callable[[str], None]
CELL_FORMAT = "malex-study-cell"


@dataclass(frozen=True)
class Cell:
    """One cell of the grid."""

    dataset: str
    attack: str
    seed: int

    @property
    def label(self) -> str:
        return f"{self.dataset} / {self.attack} / seed {self.seed}"


@dataclass(frozen=True)
class Selection:
    """A part of the grid to compute: cells whose dataset, attack and seed are among those named (None: any).
    Lets a long grid run in slices, in the order one chooses or on several machines into copies of a folder."""

    datasets: frozenset[str] | None = None
    attacks: frozenset[str] | None = None
    seeds: frozenset[int] | None = None

    @classmethod
    def of(cls, datasets: Iterable[str] = (), attacks: Iterable[str] = (), seeds: Iterable[int] = ()) -> "Selection":
        """Empty iterables select everything on that axis."""
        return cls(frozenset(datasets) or None, frozenset(attacks) or None, frozenset(seeds) or None)

    @property
    def everything(self) -> bool:
        return self.datasets is None and self.attacks is None and self.seeds is None

    def check(self, config: StudyConfig) -> None:
        """Raise ConfigError naming any dataset, attack or seed that the config's grid does not have."""
        known = {"dataset": {d.name for d in config.datasets},
                 "attack": {a.name for d in config.datasets for a in d.attacks}, "seed": set(config.seeds)}
        for what, chosen in (("dataset", self.datasets), ("attack", self.attacks), ("seed", self.seeds)):
            unknown = sorted(map(str, (chosen or set()) - known[what]))
            if unknown:
                raise ConfigError(f"no {what} {', '.join(unknown)} in the study's grid; expected one of "
                                  f"{', '.join(sorted(map(str, known[what])))}")

    def covers(self, cell: "Cell") -> bool:
        return ((self.datasets is None or cell.dataset in self.datasets)
                and (self.attacks is None or cell.attack in self.attacks)
                and (self.seeds is None or cell.seed in self.seeds))


@dataclass
class StudyRun:
    """What a run did: the cells it computed and skipped, counts of the work done, and its files."""

    out_dir: Path
    cells: list[Cell]
    computed: list[Cell]
    skipped: list[Cell]
    counts: dict[str, int]
    seconds: float
    files: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class Pools:
    """The clean splits of one (dataset, seed)."""

    data: Dataset
    fit: Split
    calibration: Split
    clean: Split
    sources: Split


@dataclass
class _Fit:
    """A fitted detector's cached outputs; the detector itself is restored only when new inputs need scores."""

    id: str
    calibration: np.ndarray
    clean: np.ndarray
    path: Path
    detector: Detector | None = None


@dataclass
class _GuardFit:
    id: str
    clean_score: np.ndarray
    clean_flagged: np.ndarray
    guard: Any = None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _with_seed(config_class: type, settings: dict[str, Any], seed: int) -> dict[str, Any]:
    """`settings` plus `seed` when the config has a seed field the user did not set."""
    names = {f.name for f in dataclasses.fields(config_class)}
    return {**settings, "seed": seed} if "seed" in names and "seed" not in settings else dict(settings)


def seeded_settings(name: str, model: nn.Module, settings: dict[str, Any], seed: int) -> dict[str, Any]:
    """A detector's settings plus the study's seed, when its config has a seed the user did not set."""
    if "seed" in settings:
        return dict(settings)
    config = getattr(make_detector(name, model, **settings), "config", None)
    has_seed = dataclasses.is_dataclass(config) and "seed" in {f.name for f in dataclasses.fields(config)}
    return {**settings, "seed": seed} if has_seed else dict(settings)


def build_detector(name: str, model: nn.Module, settings: dict[str, Any], seed: int) -> Detector:
    """`make_detector`, with the study's seed when the detector's config has a seed the user did not set."""
    return make_detector(name, model, **seeded_settings(name, model, settings, seed))


class Study:
    """Run (or resume) a study into an output folder, and build its tables and report."""

    def __init__(self, config: StudyConfig, out_dir: str | Path, progress: bool = True, log: Log | None = None
                 ) -> None:
        self.config = config
        self.layout = StudyLayout(out_dir)
        self.progress = progress
        self.log: Log = log or (lambda _msg: None)
        self.device = select_device(config.device)
        self.counts = {k: 0 for k in ("models_trained", "attacks_crafted", "detectors_fitted", "guards_fitted",
                                      "detector_scores", "guard_screenings", "analyses")}
        self._memo: dict[tuple, Any] = {}
        self._memo_group: tuple[str, int] | None = None

    # --- the grid ------------------------------------------------------------------------------------------
    def cells(self) -> list[Cell]:
        """Every cell, grouped so that one model's work is done together."""
        out = []
        for ds in self.config.datasets:
            for seed in self.config.seeds:
                for key in ds.model_keys:
                    out += [Cell(ds.name, a.name, seed) for a in ds.attacks_on(key)]
        return out

    def run(self, config_text: str | None = None, report: bool = True, select: Selection = Selection()) -> StudyRun:
        """Compute every unfinished cell (of `select` only, when given), then the analysis (of the models whose
        attacks are all crafted, when only part of the grid was selected), the tables and (optionally) the
        report, both over the whole grid.
        `config_text`: the TOML the config came from, kept in the folder as study.toml."""
        start = time.perf_counter()
        select.check(self.config)
        self.layout.claim(self.config.raw, self.config.base_dir, config_text)
        cells = [c for c in self.cells() if select.covers(c)]
        computed, skipped = [], []
        for i, cell in enumerate(cells, 1):
            where = f"[{i}/{len(cells)}] {cell.label}"
            if self.cell_finished(cell):
                self.log(f"{where}: finished earlier, skipped")
                skipped.append(cell)
                continue
            self.log(f"{where}: running")
            t0 = time.perf_counter()
            self._compute_cell(cell)
            computed.append(cell)
            self.log(f"{where}: done in {time.perf_counter() - t0:.1f} s")
        self._forget()
        if self.config.analysis.enabled:
            self._analyses(make_missing=select.everything)
        files = self.write_tables()
        if report:
            files["report"] = self.build_report()
        return StudyRun(self.layout.root, cells, computed, skipped, dict(self.counts),
                        time.perf_counter() - start, files)

    # --- in-memory reuse within one (dataset, seed) ------------------------------------------------------------
    def _remember(self, group: tuple[str, int], key: tuple, make: Callable[[], Any]) -> Any:
        if self._memo_group != group:
            self._forget()
            self._memo_group = group
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def _forget(self) -> None:
        self._memo.clear()
        self._memo_group = None

    # --- specs: what each artifact is made from ---------------------------------------------------------------
    def _data_spec(self, ds: DatasetSpec, seed: int) -> dict[str, Any]:
        spec = {"data": ds.data, "data_dir": self.config.data_dir, "seed": seed, "n_fit": ds.n_fit,
                "n_calibration": ds.n_calibration, "n_clean": ds.n_clean}
        if self._grouped(ds, seed):
            spec["validation_split"] = "whole groups, stratified by the class of their first input"
        return spec

    def _grouped(self, ds: DatasetSpec, seed: int) -> bool:
        """Does the dataset's validation split come in groups of near-copies (GTSRB's tracks)?"""
        return self._pools(ds, seed).data.val.groups is not None

    def _model_spec(self, ds: DatasetSpec, seed: int, key: str) -> dict[str, Any]:
        backdoor = ds.backdoor_of(key)
        return {"data": ds.data, "data_dir": self.config.data_dir, "seed": seed, "arch": ds.arch, "train": ds.train,
                "backdoor": None if backdoor is None else {**backdoor.describe(), "rate": ds.rate_of(backdoor),
                                                           "target": ds.target}}

    def _attack_spec(self, ds: DatasetSpec, seed: int, attack: AttackSpec, model_id: str) -> dict[str, Any]:
        return {"model": model_id, "attack": attack.describe(), "n_malicious": ds.n_malicious,
                "target": ds.target, "sources": {"data": ds.data, "data_dir": self.config.data_dir, "seed": seed}}

    def _fit_spec(self, ds: DatasetSpec, seed: int, detector: str, model_id: str) -> dict[str, Any]:
        return {"model": model_id, "detector": detector, "settings": ds.detector_settings.get(detector, {}),
                "split": self._data_spec(ds, seed)}

    def _guard_spec(self, ds: DatasetSpec, seed: int, model_id: str) -> dict[str, Any]:
        spec = {"model": model_id, "detectors": list(ds.guard), "fpr": self.config.fpr, "seeded": True,
                "settings": {d: ds.detector_settings.get(d, {}) for d in ds.guard}, "split": self._data_spec(ds, seed)}
        if self._grouped(ds, seed):
            spec["groups_kept_whole"] = True  # the guard's own fit / calibration split keeps groups whole
        return spec

    # --- reading what is on disk (no computing) ----------------------------------------------------------------
    def _model_meta(self, ds: DatasetSpec, seed: int, key: str) -> dict[str, Any] | None:
        try:
            meta = read_description(self.layout.model(ds.name, seed, key))["info"].get("study")
        except (ModelFileError, KeyError, AttributeError):
            return None
        return meta if matches(meta, self._model_spec(ds, seed, key)) else None

    def _expected_cell_spec(self, cell: Cell) -> dict[str, Any] | None:
        """The spec a finished cell must record, from the artifacts on disk; None when one is missing."""
        ds = self.config.dataset(cell.dataset)
        attack = ds.attack(cell.attack)
        model = self._model_meta(ds, cell.seed, attack.model_key)
        if model is None:
            return None
        L = self.layout
        made = read_meta(L.attack(ds.name, cell.seed, attack.name))
        if not matches(made, self._attack_spec(ds, cell.seed, attack, model["id"])):
            return None
        fits = {}
        for det in ds.detectors:
            got = read_meta(L.fit(ds.name, cell.seed, attack.model_key, det))
            if not matches(got, self._fit_spec(ds, cell.seed, det, model["id"])):
                return None
            fits[det] = got["id"]
        guard = read_meta(L.guard_clean(ds.name, cell.seed, attack.model_key))
        if not matches(guard, self._guard_spec(ds, cell.seed, model["id"])):
            return None
        return self._cell_spec(made["id"], fits, guard["id"])

    def _cell_spec(self, attack_id: str, fits: dict[str, str], guard_id: str) -> dict[str, Any]:
        return {"attack": attack_id, "fits": fits, "guard": guard_id, "fpr": self.config.fpr}

    def cell_metrics(self, cell: Cell) -> dict[str, Any] | None:
        """The finished cell's metrics.json, or None when it or another file of the cell is missing, damaged
        or out of date."""
        L = self.layout
        metrics = read_json(L.cell_metrics(cell.dataset, cell.attack, cell.seed))
        if metrics is None or metrics.get("format") != CELL_FORMAT:
            return None
        expected = self._expected_cell_spec(cell)
        if expected is None or metrics.get("spec") != normalise(expected):
            return None
        for det, fit_id in expected["fits"].items():
            if not matches(read_meta(L.cell_scores(cell.dataset, cell.attack, cell.seed, det)),
                           {"attack": expected["attack"], "fit": fit_id}):
                return None
        if not matches(read_meta(L.cell_guard(cell.dataset, cell.attack, cell.seed)),
                       {"attack": expected["attack"], "guard": expected["guard"]}):
            return None
        return metrics

    def cell_finished(self, cell: Cell) -> bool:
        return self.cell_metrics(cell) is not None

    # --- data ------------------------------------------------------------------------------------------------
    def _pools(self, ds: DatasetSpec, seed: int) -> Pools:
        return self._remember((ds.name, seed), ("pools",), lambda: self._make_pools(ds, seed))

    def _make_pools(self, ds: DatasetSpec, seed: int) -> Pools:
        data = load_dataset(ds.data, seed=seed, data_dir=self.config.data_dir)
        if not 0 <= ds.target < data.num_classes:
            raise ConfigError(f"datasets.{ds.name}.target: {ds.target} is not a class of {data.name}; expected "
                              f"0..{data.num_classes - 1}")
        # near-copies (GTSRB's frames of one sign) stay on one side
        fit_idx, cal_idx = split_keeping_groups(data.val.y, data.val.groups, (0.5, 0.5), seed)
        clean_idx, source_idx = stratified_split(data.test.y, (0.5, 0.5), seed)
        return Pools(data, data.val.subset(fit_idx[:ds.n_fit]), data.val.subset(cal_idx[:ds.n_calibration]),
                     data.test.subset(clean_idx), data.test.subset(source_idx))

    def _clean_test(self, ds: DatasetSpec, seed: int, key: str) -> torch.Tensor:
        """Up to n_clean clean test inputs that the model classifies correctly."""
        def make() -> torch.Tensor:
            pool = self._pools(ds, seed).clean
            model = self._model(ds, seed, key)[0]
            return pool.x[predict(model, pool.x) == pool.y][:ds.n_clean]
        return self._remember((ds.name, seed), ("clean", key), make)

    # --- models ------------------------------------------------------------------------------------------------
    def _model(self, ds: DatasetSpec, seed: int, key: str) -> tuple[nn.Module, dict[str, Any]]:
        return self._remember((ds.name, seed), ("model", key), lambda: self._load_or_train(ds, seed, key))

    def _load_or_train(self, ds: DatasetSpec, seed: int, key: str) -> tuple[nn.Module, dict[str, Any]]:
        path = self.layout.model(ds.name, seed, key)
        meta = self._model_meta(ds, seed, key)
        if meta is not None:
            try:
                model, _ = load_model(path, self.device)
                return model, meta
            except ModelFileError:
                pass
        pools = self._pools(ds, seed)
        data = pools.data
        backdoor = ds.backdoor_of(key)
        what = "the clean model" if backdoor is None else f"the model poisoned with {backdoor.name}"
        self.log(f"  training {what} ({ds.arch}, {ds.train.get('epochs', TrainConfig.epochs)} epochs)")
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        model = build_model(ds.arch, data.image_shape, data.num_classes).to(self.device)
        train_split, info = data.train, {}
        trigger = None
        if backdoor is not None:
            trigger = make_trigger(backdoor.method, **backdoor.settings)
            train_split, _ = poison_split(data.train, trigger, PoisonConfig(ds.rate_of(backdoor), ds.target, seed))
        train_classifier(model, train_split, TrainConfig(**ds.train, seed=seed), progress=self.progress)
        info["clean_accuracy"] = accuracy(model, data.test.x, data.test.y)
        if trigger is not None:
            info["attack_success_rate"] = attack_success_rate(model, data.test, trigger, ds.target)
        meta = {"spec": normalise(self._model_spec(ds, seed, key)), "id": new_id(), **info,
                "seconds": time.perf_counter() - t0}
        save_model(model, path, ds.arch, info={"dataset": data.name, "study": meta}, overwrite=True)
        self.counts["models_trained"] += 1
        facts = ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in info.items())
        self.log(f"  {what}: {facts} ({meta['seconds']:.0f} s)")
        return model, meta

    # --- attacks ------------------------------------------------------------------------------------------------
    def _attack(self, ds: DatasetSpec, seed: int, attack: AttackSpec) -> tuple[torch.Tensor, dict[str, Any]]:
        return self._remember((ds.name, seed), ("attack", attack.name), lambda: self._load_or_craft(ds, seed, attack))

    def _load_or_craft(self, ds: DatasetSpec, seed: int, attack: AttackSpec) -> tuple[torch.Tensor, dict[str, Any]]:
        model, model_meta = self._model(ds, seed, attack.model_key)
        spec = self._attack_spec(ds, seed, attack, model_meta["id"])
        path = self.layout.attack(ds.name, seed, attack.name)
        got = read_tensors(path)
        if got is not None and matches(got[0], spec) and "x" in got[1]:
            return got[1]["x"], got[0]
        t0 = time.perf_counter()
        pools = self._pools(ds, seed)
        if attack.kind == BACKDOOR:
            x, extra, summary = self._backdoor_inputs(model, pools.sources, ds, attack)
        else:
            x, extra, summary = self._adversarial_inputs(model, pools.sources, ds, attack, seed)
        summary["seconds"] = time.perf_counter() - t0
        meta = {"spec": normalise(spec), "id": new_id(), "summary": summary}
        write_tensors(path, {"x": x, **extra}, meta)
        self.counts["attacks_crafted"] += 1
        self.log(f"  {attack.name}: {len(x)} malicious inputs kept (success rate {summary['success_rate']:.3f}, "
                 f"{summary['seconds']:.0f} s)")
        return x, meta

    def _backdoor_inputs(self, model: nn.Module, sources: Split, ds: DatasetSpec, attack: AttackSpec
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        trigger = make_trigger(attack.method, **attack.settings)
        index = torch.nonzero(sources.y != ds.target).flatten()
        stamped = trigger.apply(sources.x[index])
        hit = predict(model, stamped) == ds.target
        kept = torch.nonzero(hit).flatten()[:ds.n_malicious]
        summary = {"success_rate": float(hit.float().mean()) if len(hit) else float("nan"), "n": len(kept),
                   "n_tried": len(index)}
        return stamped[kept], {"source_index": index[kept]}, summary

    def _adversarial_inputs(self, model: nn.Module, sources: Split, ds: DatasetSpec, attack: AttackSpec, seed: int
                            ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        correct = torch.nonzero(predict(model, sources.x) == sources.y).flatten()
        num_classes = int(getattr(model, "num_classes", int(sources.y.max()) + 1))
        if attack.targeted:  # every source toward each other class, source by source
            index = correct.repeat_interleave(num_classes - 1)
            offsets = torch.arange(1, num_classes).repeat(len(correct))
            targets = (sources.y[index] + offsets) % num_classes
        else:
            index, targets = correct, None
        settings = _with_seed(ADVERSARIAL_ATTACKS[attack.method].config_class, attack.settings, seed)
        method = make_adversarial(attack.method, **settings)
        chunk = self.config.batch_size
        kept_x, kept_i, kept_t, l2, linf = [], [], [], [], []
        tried = found = 0
        with contextlib.closing(track(range(0, len(index), chunk), f"{attack.name} on {ds.name} (chunks)",
                                      enabled=self.progress)) as chunks:
            for start in chunks:
                sl = slice(start, start + chunk)
                result = method.run(model, sources.x[index[sl]], sources.y[index[sl]],
                                    target=None if targets is None else targets[sl],
                                    batch_size=self.config.batch_size, progress=False)
                ok = result.success
                tried += len(ok)
                found += int(ok.sum())
                kept_x.append(result.x_adv[ok])
                kept_i.append(index[sl][ok])
                kept_t.append((targets[sl] if targets is not None else result.pred)[ok])
                l2.append(result.l2[ok])
                linf.append(result.linf[ok])
                if found >= ds.n_malicious:
                    break
        n = min(found, ds.n_malicious)
        x = torch.cat(kept_x)[:n] if kept_x else torch.zeros((0, *sources.x.shape[1:]))
        l2_all = torch.cat(l2)[:n] if l2 else torch.zeros(0)
        linf_all = torch.cat(linf)[:n] if linf else torch.zeros(0)
        summary = {"success_rate": found / tried if tried else float("nan"), "n": n, "n_tried": tried,
                   "mean_l2": float(l2_all.mean()) if n else float("nan"),
                   "mean_linf": float(linf_all.mean()) if n else float("nan")}
        extra = {"source_index": torch.cat(kept_i)[:n] if kept_i else torch.zeros(0, dtype=torch.long),
                 "label": torch.cat(kept_t)[:n] if kept_t else torch.zeros(0, dtype=torch.long)}
        return x, extra, summary

    # --- detectors ----------------------------------------------------------------------------------------------
    def _fits(self, ds: DatasetSpec, seed: int, key: str) -> dict[str, _Fit]:
        """Every detector of the dataset fitted on `key`'s model: read from the cache or fitted now."""
        return self._remember((ds.name, seed), ("fits", key), lambda: self._load_or_fit(ds, seed, key))

    def _load_or_fit(self, ds: DatasetSpec, seed: int, key: str) -> dict[str, _Fit]:
        model, model_meta = self._model(ds, seed, key)
        fits: dict[str, _Fit] = {}
        missing = []
        for det in ds.detectors:
            path = self.layout.fit(ds.name, seed, key, det)
            got = read_tensors(path)
            if got is not None and matches(got[0], self._fit_spec(ds, seed, det, model_meta["id"])) \
                    and {"calibration", "clean"} <= set(got[1]):
                fits[det] = _Fit(got[0]["id"], got[1]["calibration"].numpy(), got[1]["clean"].numpy(), path)
            else:
                missing.append(det)
        if missing:
            fits.update(self._fit_detectors(ds, seed, key, missing))
        return {det: fits[det] for det in ds.detectors}

    def _fit_detectors(self, ds: DatasetSpec, seed: int, key: str, names: list[str]) -> dict[str, _Fit]:
        model, model_meta = self._model(ds, seed, key)
        pools = self._pools(ds, seed)
        clean = self._clean_test(ds, seed, key)
        dets = {name: build_detector(name, model, ds.detector_settings.get(name, {}), seed) for name in names}
        probe = Probe(model, [layer for d in dets.values() for layer in d.layers()])
        self.log(f"  fitting {', '.join(names)} on {len(pools.fit)} clean inputs ({key} model)")
        obs = {name: probe.run(x, batch_size=self.config.batch_size)
               for name, x in (("fit", pools.fit.x), ("calibration", pools.calibration.x), ("clean", clean))}
        out = {}
        for name, det in track(list(dets.items()), f"fitting detectors ({key} model)", enabled=self.progress):
            t0 = time.perf_counter()
            det.fit(obs["fit"], pools.fit.y)
            cal, clean_scores = det.score(obs["calibration"]), det.score(obs["clean"])
            try:
                state, tensors = det.export()
            except TypeError as exc:
                raise ConfigError(f"detector {name!r} cannot save its fitted state, which the study caches ({exc})"
                                  ) from exc
            meta = {"spec": normalise(self._fit_spec(ds, seed, name, model_meta["id"])), "id": new_id(),
                    "state": state, "seconds": time.perf_counter() - t0}
            path = self.layout.fit(ds.name, seed, key, name)
            write_tensors(path, {"calibration": torch.from_numpy(np.asarray(cal, np.float64)),
                                 "clean": torch.from_numpy(np.asarray(clean_scores, np.float64)),
                                 **{f"state/{k}": v for k, v in tensors.items()}}, meta)
            out[name] = _Fit(meta["id"], np.asarray(cal, np.float64), np.asarray(clean_scores, np.float64), path, det)
            self.counts["detectors_fitted"] += 1
        return out

    def _restored(self, ds: DatasetSpec, seed: int, key: str, name: str, fit: _Fit) -> Detector:
        """The fitted detector, restored from its cached state (refitting, with a new id, if that fails)."""
        if fit.detector is not None:
            return fit.detector
        model = self._model(ds, seed, key)[0]
        got = read_tensors(fit.path)
        if got is not None and got[0].get("id") == fit.id and got[0].get("state") is not None:
            det = build_detector(name, model, ds.detector_settings.get(name, {}), seed)
            prefix = "state/"
            try:
                det.restore(got[0]["state"], {k[len(prefix):]: v for k, v in got[1].items() if k.startswith(prefix)})
                fit.detector = det
                return det
            except MalexError:
                pass
        refit = self._fit_detectors(ds, seed, key, [name])[name]
        self._fits(ds, seed, key)[name] = refit
        return refit.detector

    def _malicious_scores(self, cell: Cell, ds: DatasetSpec, x: torch.Tensor, attack_id: str,
                          fits: dict[str, _Fit], key: str) -> dict[str, np.ndarray]:
        scores, missing = {}, []
        for name, fit in fits.items():
            got = read_tensors(self.layout.cell_scores(cell.dataset, cell.attack, cell.seed, name))
            if got is not None and matches(got[0], {"attack": attack_id, "fit": fit.id}) and "scores" in got[1]:
                scores[name] = got[1]["scores"].numpy()
            else:
                missing.append(name)
        if not missing:
            return scores
        if len(x):
            dets = {name: self._restored(ds, cell.seed, key, name, fits[name]) for name in missing}
            obs = Probe(dets[missing[0]].model, [layer for d in dets.values() for layer in d.layers()]).run(
                x, batch_size=self.config.batch_size)
        for name in track(missing, f"scoring {cell.attack}", enabled=self.progress and len(x) > 0):
            s = np.asarray(dets[name].score(obs), np.float64) if len(x) else np.zeros(0)
            write_tensors(self.layout.cell_scores(cell.dataset, cell.attack, cell.seed, name),
                          {"scores": torch.from_numpy(s)},
                          {"spec": normalise({"attack": attack_id, "fit": fits[name].id}), "id": new_id()})
            scores[name] = s
            self.counts["detector_scores"] += 1
        return scores

    # --- the guard ----------------------------------------------------------------------------------------------
    def _guard(self, ds: DatasetSpec, seed: int, key: str) -> _GuardFit:
        return self._remember((ds.name, seed), ("guard", key), lambda: self._load_or_fit_guard(ds, seed, key))

    def _guard_config(self, ds: DatasetSpec, seed: int, model: nn.Module):
        """The guard's config: the dataset's guard detectors with their settings, seeded by the study's seed."""
        from malex.guard import GuardConfig

        settings = {d: seeded_settings(d, model, ds.detector_settings.get(d, {}), seed) for d in ds.guard}
        return GuardConfig(detectors=tuple(ds.guard), settings={d: v for d, v in settings.items() if v},
                           fpr=self.config.fpr, seed=seed, progress=False)

    def _load_or_fit_guard(self, ds: DatasetSpec, seed: int, key: str) -> _GuardFit:
        model_meta = self._model(ds, seed, key)[1]
        got = read_tensors(self.layout.guard_clean(ds.name, seed, key))
        if got is not None and matches(got[0], self._guard_spec(ds, seed, model_meta["id"])) \
                and self.layout.guard(ds.name, seed, key).is_file():
            return _GuardFit(got[0]["id"], got[1]["guard_score"].numpy(), got[1]["flagged"].numpy().astype(bool))
        return self._fit_guard(ds, seed, key)

    def _fit_guard(self, ds: DatasetSpec, seed: int, key: str) -> _GuardFit:
        from malex.guard import Guard

        model, model_meta = self._model(ds, seed, key)
        pools = self._pools(ds, seed)
        x = torch.cat([pools.fit.x, pools.calibration.x])
        y = torch.cat([pools.fit.y, pools.calibration.y])
        groups = None if pools.fit.groups is None else torch.cat([pools.fit.groups, pools.calibration.groups])
        self.log(f"  fitting the guard ({', '.join(ds.guard)}) on {len(x)} clean inputs ({key} model)")
        guard = Guard(model, self._guard_config(ds, seed, model)).fit(x, y, groups)
        clean = guard.screen(self._clean_test(ds, seed, key))
        guard.save(self.layout.guard(ds.name, seed, key), overwrite=True)
        score = np.asarray(clean.guard_score, np.float64)
        flagged = np.asarray(clean.flagged, bool)
        meta = {"spec": normalise(self._guard_spec(ds, seed, model_meta["id"])), "id": new_id()}
        write_tensors(self.layout.guard_clean(ds.name, seed, key),
                      {"guard_score": torch.from_numpy(score), "flagged": torch.from_numpy(flagged.astype(np.uint8))},
                      meta)
        self.counts["guards_fitted"] += 1
        return _GuardFit(meta["id"], score, flagged, guard)

    def _guard_on(self, cell: Cell, ds: DatasetSpec, key: str, x: torch.Tensor, attack_id: str
                  ) -> tuple[np.ndarray, np.ndarray]:
        """The guard's score and flag on the cell's malicious inputs (cached per cell)."""
        from malex.guard import Guard

        fit = self._guard(ds, cell.seed, key)
        path = self.layout.cell_guard(cell.dataset, cell.attack, cell.seed)
        spec = {"attack": attack_id, "guard": fit.id}
        got = read_tensors(path)
        if got is not None and matches(got[0], spec):
            return got[1]["guard_score"].numpy(), got[1]["flagged"].numpy().astype(bool)
        if not len(x):
            score, flagged = np.zeros(0), np.zeros(0, bool)
        elif fit.guard is None:
            try:
                fit.guard = Guard.load(self.layout.guard(ds.name, cell.seed, key), self._model(ds, cell.seed, key)[0])
            except (MalexError, OSError):
                fit = self._fit_guard(ds, cell.seed, key)
                self._memo[("guard", key)] = fit
                spec = {"attack": attack_id, "guard": fit.id}
        if len(x):
            screened = fit.guard.screen(x)
            score = np.asarray(screened.guard_score, np.float64)
            flagged = np.asarray(screened.flagged, bool)
        write_tensors(path, {"guard_score": torch.from_numpy(score),
                             "flagged": torch.from_numpy(flagged.astype(np.uint8))},
                      {"spec": normalise(spec), "id": new_id()})
        self.counts["guard_screenings"] += 1
        return score, flagged

    # --- one cell -----------------------------------------------------------------------------------------------
    def _compute_cell(self, cell: Cell) -> dict[str, Any]:
        t0 = time.perf_counter()
        ds = self.config.dataset(cell.dataset)
        attack = ds.attack(cell.attack)
        key = attack.model_key
        _, model_meta = self._model(ds, cell.seed, key)
        x, attack_meta = self._attack(ds, cell.seed, attack)
        fits = self._fits(ds, cell.seed, key)
        scores = self._malicious_scores(cell, ds, x, attack_meta["id"], fits, key)
        guard_score, guard_flagged = self._guard_on(cell, ds, key, x, attack_meta["id"])
        guard = self._guard(ds, cell.seed, key)
        rows = []
        if len(x):
            for name in ds.detectors:
                clean, malicious, unscored = unscored_as_suspicious(fits[name].clean, scores[name])
                m = evaluate_scores(clean, malicious, calibrate(fits[name].calibration, self.config.fpr))
                rows.append({"detector": name, **m.as_dict(), "clean_fpr": 1.0 - m.clean_pass, "unscored": unscored})
            m = guard_metrics(guard.clean_score, guard.clean_flagged, guard_score, guard_flagged)
            rows.append({"detector": GUARD, **m.as_dict(), "clean_fpr": 1.0 - m.clean_pass})
        else:
            self.log(f"  {cell.attack}: no successful malicious input; the cell has no rows")
        metrics = {
            "format": CELL_FORMAT,
            "spec": normalise(self._cell_spec(attack_meta["id"], {d: fits[d].id for d in ds.detectors}, guard.id)),
            "dataset": cell.dataset, "attack": cell.attack, "kind": attack.kind, "method": attack.method,
            "seed": cell.seed, "model": key, "fpr": self.config.fpr,
            "model_summary": {k: model_meta[k] for k in ("clean_accuracy", "attack_success_rate") if k in model_meta},
            "attack_summary": attack_meta.get("summary", {}),
            "rows": rows, "seconds": time.perf_counter() - t0, "finished": _now(),
        }
        write_json(self.layout.cell_metrics(cell.dataset, cell.attack, cell.seed), metrics)
        return metrics

    # --- analysis -------------------------------------------------------------------------------------------------
    def _analysis_spec(self, ds: DatasetSpec, seed: int, key: str) -> dict[str, Any] | None:
        model = self._model_meta(ds, seed, key)
        if model is None:
            return None
        attacks = {}
        for a in ds.attacks_on(key):
            got = read_meta(self.layout.attack(ds.name, seed, a.name))
            if not matches(got, self._attack_spec(ds, seed, a, model["id"])):
                return None
            attacks[a.name] = got["id"]
        settings = dataclasses.asdict(self.config.analysis)
        settings.pop("enabled")
        return {"model": model["id"], "attacks": attacks, "analysis": settings, "split": self._data_spec(ds, seed)}

    def analysis(self, ds: DatasetSpec, key: str) -> SpaceData | None:
        """The cached three-space data of `key`'s model at the analysis seed (None when not computed)."""
        seed = self.config.analysis_seed
        spec = self._analysis_spec(ds, seed, key)
        got = read_tensors(self.layout.analysis(ds.name, seed, key))
        if spec is None or got is None or not matches(got[0], spec):
            return None
        try:
            return SpaceData.from_tensors(got[0]["data"], got[1])
        except (KeyError, TypeError):
            return None

    def _analyses(self, make_missing: bool = True) -> None:
        """The three-space analysis of every model at the analysis seed. `make_missing`: train the model and
        craft its attacks when they are not on disk (else leave that model's analysis for a later run)."""
        seed = self.config.analysis_seed
        a = self.config.analysis
        for ds in self.config.datasets:
            for key in ds.model_keys:
                if self.analysis(ds, key) is not None:
                    continue
                if self._analysis_spec(ds, seed, key) is None:  # its model or attacks are not made yet
                    if not make_missing:
                        self.log(f"analysis: {ds.name} / {key} model / seed {seed} waits for its model and attacks")
                        continue
                    for attack in ds.attacks_on(key):
                        self._attack(ds, seed, attack)
                self.log(f"analysis: {ds.name} / {key} model / seed {seed}")
                model = self._model(ds, seed, key)[0]
                inputs = {BENIGN: self._clean_test(ds, seed, key)}
                for attack in ds.attacks_on(key):
                    inputs[f"{attack.kind}: {attack.name}"] = self._attack(ds, seed, attack)[0]
                data = analyse_model(model, self._pools(ds, seed).fit, inputs, a.strengths, a.mutants, a.embedding,
                                     a.layers, a.n, seed, self.config.batch_size)
                header, tensors = data.to_tensors()
                write_tensors(self.layout.analysis(ds.name, seed, key), tensors,
                              {"spec": normalise(self._analysis_spec(ds, seed, key)), "id": new_id(), "data": header})
                self.counts["analyses"] += 1
        self._forget()

    # --- results ---------------------------------------------------------------------------------------------------
    def results(self) -> tuple[list[dict[str, Any]], list[Cell]]:
        """(metrics of the finished cells, cells not finished)."""
        done, missing = [], []
        for cell in self.cells():
            m = self.cell_metrics(cell)
            (done.append(m) if m is not None else missing.append(cell))
        return done, missing

    def cell_scores(self, cell: Cell) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{detector or 'guard': (clean scores, malicious scores)} of a finished cell, from the cache."""
        ds = self.config.dataset(cell.dataset)
        key = ds.attack(cell.attack).model_key
        out = {}
        for det in ds.detectors:
            fit = read_tensors(self.layout.fit(ds.name, cell.seed, key, det))
            mal = read_tensors(self.layout.cell_scores(ds.name, cell.attack, cell.seed, det))
            if fit is not None and mal is not None:
                out[det] = (fit[1]["clean"].numpy(), mal[1]["scores"].numpy())
        clean = read_tensors(self.layout.guard_clean(ds.name, cell.seed, key))
        mal = read_tensors(self.layout.cell_guard(ds.name, cell.attack, cell.seed))
        if clean is not None and mal is not None:
            out[GUARD] = (clean[1]["guard_score"].numpy(), mal[1]["guard_score"].numpy())
        return {k: v for k, v in out.items() if len(v[0]) and len(v[1])}

    def write_tables(self) -> dict[str, Path]:
        """results.md, results.csv (one row per cell and detector) and summary.csv (mean and std over seeds)."""
        from malex.evaluate.study.aggregate import summarise, write_csv_rows, write_markdown, write_summary_csv

        done, missing = self.results()
        summary = summarise(done)
        L = self.layout
        write_csv_rows(done, L.results_csv)
        write_summary_csv(summary, L.summary_csv)
        write_markdown(done, summary, missing, L.results_md, seeds=self.config.seeds, fpr=self.config.fpr)
        return {"results_md": L.results_md, "results_csv": L.results_csv, "summary_csv": L.summary_csv}

    def build_report(self) -> Path:
        """The offline HTML report (PNG plots beside it) under OUT/report/; returns the page's path."""
        from malex.evaluate.study.report import build_report

        return build_report(self)


def unscored_as_suspicious(clean: np.ndarray, malicious: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Clean and malicious scores with NaN (an input a detector could not score) and +inf set above every
    finite score, as a threshold treats them (flagged), and -inf below; also returns how many there were."""
    both = np.concatenate([clean, malicious]).astype(np.float64)
    finite = np.isfinite(both)
    if finite.all():
        return clean, malicious, 0
    lo, hi = (float(both[finite].min()), float(both[finite].max())) if finite.any() else (0.0, 0.0)
    fixed = np.where(np.isneginf(both), lo - 1.0, np.where(finite, both, hi + 1.0))
    return fixed[:len(clean)], fixed[len(clean):], int((~finite).sum())


def guard_metrics(clean_score: np.ndarray, clean_flagged: np.ndarray, malicious_score: np.ndarray,
                  malicious_flagged: np.ndarray) -> DetectionMetrics:
    """The guard's row: threshold-free metrics on its guard score, and at its own verdicts the clean inputs
    passed and malicious inputs caught."""
    return DetectionMetrics(
        auroc=auroc(clean_score, malicious_score),
        tpr_at_1fpr=tpr_at_fpr(clean_score, malicious_score, 0.01),
        tpr_at_5fpr=tpr_at_fpr(clean_score, malicious_score, 0.05),
        clean_pass=float(1.0 - np.mean(clean_flagged)),
        malicious_caught=float(np.mean(malicious_flagged)),
        n_clean=int(len(clean_score)),
        n_malicious=int(len(malicious_score)),
    )


def run_study(config: StudyConfig | str | Path, out_dir: str | Path, progress: bool = True, log: Log | None = None,
              report: bool = True, select: Selection = Selection()) -> StudyRun:
    """Run or resume the study `config` (a parsed config or a TOML path) into `out_dir` (only the cells of
    `select`, when given)."""
    text = None
    if not isinstance(config, StudyConfig):
        path = Path(config)
        config = load_config(path)
        text = path.read_text(encoding="utf-8")
    return Study(config, out_dir, progress=progress, log=log).run(text, report=report, select=select)


def open_study(out_dir: str | Path, progress: bool = False, log: Log | None = None) -> Study:
    """The study recorded in an output folder (the config of its latest run), to rebuild tables or the report."""
    raw, base_dir = StudyLayout(out_dir).recorded_config()
    return Study(parse_config(raw, base_dir=base_dir), out_dir, progress, log)
