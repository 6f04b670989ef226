"""The study's grid: datasets x attacks x detectors x seeds, cached so that a rerun redoes nothing.

A cell is (dataset, attack, seed); it holds one row per detector and one for the guard. Per (dataset,
seed), a clean model is trained for the adversarial attacks and one poisoned model per backdoor; each is
trained once and cached. The protocol of the study, per cell:

* the clean validation split is cut in two (stratified, by the seed): detectors fit on up to `n_fit` inputs
  of one half, and each detector's threshold is set at the target FPR on up to `n_calibration` of the other;
  the guard fits on both halves together (it keeps its own calibration part);
* the test split is cut in two: up to `n_clean` inputs of one half that the cell's model classifies
  correctly are the clean test inputs; the other half gives the attack sources;
* malicious inputs, up to `n_malicious`, successful ones only: for a backdoor, non-target sources (a
  source-specific trigger's source classes only) with the trigger that the poisoned model labels as the
  target; for an adversarial attack, correctly classified sources attacked on the clean model (with
  `targeted`, toward each other class, as the study's CW);
* metrics: AUROC, TPR at 1% and 5% FPR (threshold-free, on the clean test scores), and at the calibrated
  threshold the clean inputs passed, the malicious inputs caught and the study's detection accuracy; the
  guard's row reads its guard score and its own verdicts.

Fitted detectors (their state, calibration and clean scores) are cached per model, so a new attack only
scores its inputs. Every artifact records the ids of what it was made from (specs.py, cache.py): a changed
setting or a damaged file redoes what depends on it, and nothing else. This module orders the work; the
pieces are grid.py (cells), seed.py (one dataset and seed's artifacts), cell.py (a cell's metrics),
adaptive.py (the adaptive attacks against each (dataset, seed)'s guard, run after the cells; not grid cells) and
analysis_step.py; the tables and the report are drawn by malex.report from the plain results.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from malex.evaluate.study.adaptive import adaptive_rows
from malex.evaluate.study.analysis import SpaceData
from malex.evaluate.study.analysis_step import analysis_spec, make_analysis, recorded_analysis
from malex.evaluate.study.cache import StudyLayout, read_tensors
from malex.evaluate.study.cell import compute_cell, finished_metrics, mark_learnt
from malex.evaluate.study.config import CLEAN_MODEL, GUARD, DatasetSpec, StudyConfig, load_config, parse_config
from malex.evaluate.study.context import Log, StudyContext, quiet
from malex.evaluate.study.grid import Cell, Selection, grid_cells
from malex.evaluate.study.seed import SeedRun
from malex.device import select_device
from malex.report.adaptive import adaptive_markdown, summarise_adaptive, write_adaptive_csv
from malex.report.aggregate import summarise, write_csv_rows, write_markdown, write_summary_csv
from malex.report.study_page import DatasetView, StudyView, build_report


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


class Study:
    """Run (or resume) a study into an output folder, and build its tables and report."""

    def __init__(self, config: StudyConfig, out_dir: str | Path, progress: bool = True, log: Log | None = None
                 ) -> None:
        self.config = config
        self.layout = StudyLayout(out_dir)
        self.ctx = StudyContext(config, self.layout, select_device(config.device), progress, log or quiet)
        self._current: SeedRun | None = None

    @property
    def counts(self) -> dict[str, int]:
        return self.ctx.counts

    def _seed_run(self, dataset: str, seed: int) -> SeedRun:
        """The artifacts of (dataset, seed); those of the previous (dataset, seed) are let go."""
        if self._current is None or (self._current.ds.name, self._current.seed) != (dataset, seed):
            self._current = SeedRun(self.ctx, self.config.dataset(dataset), seed)
        return self._current

    def cells(self) -> list[Cell]:
        """Every cell, grouped so that one model's work is done together."""
        return grid_cells(self.config)

    def run(self, config_text: str | None = None, report: bool = True, select: Selection = Selection()) -> StudyRun:
        """Compute every unfinished cell (of `select` only, when given), then the adaptive attacks, the analysis (of the models whose
        attacks are all crafted, when only part of the grid was selected), the tables and (optionally) the
        report, both over the whole grid.
        `config_text`: the TOML the config came from, kept in the folder as study.toml."""
        start = time.perf_counter()
        select.check(self.config)
        self.layout.claim(self.config.raw, self.config.base_dir, config_text)
        cells = [c for c in self.cells() if select.covers(c)]
        computed, skipped = [], []
        log = self.ctx.log
        for i, cell in enumerate(cells, 1):
            where = f"[{i}/{len(cells)}] {cell.label}"
            earlier = self.cell_metrics(cell)
            if earlier is not None and "verdict" in earlier:
                log(f"{where}: finished earlier, skipped")
                skipped.append(cell)
                continue
            # a cell finished before the guard's verdicts were measured is measured again from the cached
            # models, attacks and scores (the guard screens its inputs once more)
            log(f"{where}: {'measuring the verdicts' if earlier is not None else 'running'}")
            t0 = time.perf_counter()
            self.compute(cell)
            computed.append(cell)
            log(f"{where}: done in {time.perf_counter() - t0:.1f} s")
        self._current = None
        self._adaptive(select)
        if self.config.analysis.enabled:
            self._analyses(make_missing=select.everything)
        files = self.write_tables()
        if report:
            files["report"] = self.build_report()
        return StudyRun(self.layout.root, cells, computed, skipped, dict(self.counts),
                        time.perf_counter() - start, files)

    def compute(self, cell: Cell) -> dict:
        """Compute one cell (reading what is cached, making the rest) and write its metrics; no claim of the
        folder (`run` claims it; a Ray worker computes cells of a folder its driver claimed)."""
        return compute_cell(self._seed_run(cell.dataset, cell.seed), cell)

    def adaptive_cells(self) -> list[Cell]:
        """Every (dataset, adaptive attack, seed), in the grid's order of datasets and seeds."""
        return [Cell(ds.name, a.name, seed) for ds in self.config.datasets for seed in self.config.seeds
                for a in ds.adaptive]

    def _adaptive(self, select: Selection = Selection()) -> None:
        """Run (or read) every selected adaptive attack against the guard of its (dataset, seed)."""
        cells = [c for c in self.adaptive_cells() if select.covers(c)]
        for i, cell in enumerate(cells, 1):
            self.ctx.log(f"[adaptive {i}/{len(cells)}] {cell.label}")
            run = self._seed_run(cell.dataset, cell.seed)
            adaptive_rows(run, next(a for a in run.ds.adaptive if a.name == cell.attack), make=True)
        self._current = None

    def adaptive_results(self) -> tuple[list[dict], list[Cell]]:
        """(one row per finished adaptive attack, seed, budget and target; the adaptive cells not finished)."""
        rows, missing = [], []
        for cell in self.adaptive_cells():
            run = self._seed_run(cell.dataset, cell.seed)
            got = adaptive_rows(run, next(a for a in run.ds.adaptive if a.name == cell.attack), make=False)
            (rows.extend(got) if got is not None else missing.append(cell))
        return rows, missing

    def analyse(self, dataset: str, key: str, make_missing: bool = True) -> None:
        """The three-space analysis of `key`'s model of `dataset` at the analysis seed, unless cached.
        `make_missing`: train the model and craft its attacks when they are not on disk (else leave that
        model's analysis for a later run)."""
        seed = self.config.analysis_seed
        run = self._seed_run(dataset, seed)
        if recorded_analysis(run, key) is not None:
            return
        if not make_missing and analysis_spec(run, key) is None:
            self.ctx.log(f"analysis: {dataset} / {key} model / seed {seed} waits for its model and attacks")
            return
        self.ctx.log(f"analysis: {dataset} / {key} model / seed {seed}")
        make_analysis(run, key)

    def _analyses(self, make_missing: bool = True) -> None:
        """The three-space analysis of every model at the analysis seed (`analyse`)."""
        for ds in self.config.datasets:
            for key in ds.model_keys:
                self.analyse(ds.name, key, make_missing)
        self._current = None

    # --- results -------------------------------------------------------------------------------------------
    def cell_metrics(self, cell: Cell) -> dict | None:
        """The finished cell's metrics.json, or None when it or another file of the cell is missing, damaged
        or out of date."""
        return finished_metrics(self._seed_run(cell.dataset, cell.seed), cell)

    def cell_finished(self, cell: Cell) -> bool:
        return self.cell_metrics(cell) is not None

    def results(self) -> tuple[list[dict], list[Cell]]:
        """(metrics of the finished cells, cells not finished); each backdoor cell says whether its attack was
        learnt (`mark_learnt`, at the config's asr_floor)."""
        done, missing = [], []
        for cell in self.cells():
            m = self.cell_metrics(cell)
            (done.append(m) if m is not None else missing.append(cell))
        return mark_learnt(done, self.config.asr_floor), missing

    def cell_scores(self, cell: Cell) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{detector or 'guard': (clean scores, malicious scores)} of a finished cell, from the cache."""
        ds = self.config.dataset(cell.dataset)
        key = ds.attack(cell.attack).model_key
        L = self.layout
        out = {}
        for det in ds.detectors:
            fit = read_tensors(L.fit(ds.name, cell.seed, key, det))
            mal = read_tensors(L.cell_scores(ds.name, cell.attack, cell.seed, det))
            if fit is not None and mal is not None:
                out[det] = (fit[1]["clean"].numpy(), mal[1]["scores"].numpy())
        clean = read_tensors(L.guard_clean(ds.name, cell.seed, key))
        mal = read_tensors(L.cell_guard(ds.name, cell.attack, cell.seed))
        if clean is not None and mal is not None:
            out[GUARD] = (clean[1]["guard_score"].numpy(), mal[1]["guard_score"].numpy())
        return {k: v for k, v in out.items() if len(v[0]) and len(v[1])}

    def analysis(self, ds: DatasetSpec, key: str) -> SpaceData | None:
        """The cached three-space data of `key`'s model at the analysis seed (None when not computed)."""
        return recorded_analysis(self._seed_run(ds.name, self.config.analysis_seed), key)

    # --- tables and report -----------------------------------------------------------------------------------
    def write_tables(self) -> dict[str, Path]:
        """results.md, results.csv (one row per cell and detector) and summary.csv (mean and std over seeds)."""
        done, missing = self.results()
        summary = summarise(done)
        L = self.layout
        write_csv_rows(done, L.results_csv)
        write_summary_csv(summary, L.summary_csv)
        files = {"results_md": L.results_md, "results_csv": L.results_csv, "summary_csv": L.summary_csv}
        sections = []
        if self.adaptive_cells():
            rows, unfinished = self.adaptive_results()
            files["adaptive_csv"] = write_adaptive_csv(rows, L.adaptive_csv)
            sections.append(adaptive_markdown(summarise_adaptive(rows), [c.label for c in unfinished]))
        write_markdown(done, summary, [c.label for c in missing], L.results_md, seeds=self.config.seeds,
                       fpr=self.config.fpr, sections=sections)
        return files

    def report_view(self) -> StudyView:
        """What the report draws, as plain data: the finished cells, the analysis seed's scores per attack and
        the three-space data per model."""
        done, missing = self.results()
        seed = self.config.analysis_seed
        finished = {(c["dataset"], c["attack"], c["seed"]): c for c in done}

        def mark(ds: DatasetSpec, attack: str) -> str:
            """' (not learnt: ASR 0.440 < 0.85)' when the analysis seed's backdoor was not learnt."""
            cell = finished.get((ds.name, attack, seed), {})
            if cell.get("learnt") is not False:
                return ""
            return (f" (not learnt: ASR {cell['model_summary']['attack_success_rate']:.3f} < "
                    f"{self.config.asr_floor:g})")

        datasets = []
        for ds in self.config.datasets:
            roc = {a.name + mark(ds, a.name): self.cell_scores(Cell(ds.name, a.name, seed)) for a in ds.attacks
                   if (ds.name, a.name, seed) in finished}
            spaces = {("clean model" if key == CLEAN_MODEL else f"{key}-poisoned model{mark(ds, key)}"):
                      self.analysis(ds, key) for key in ds.model_keys}
            spaces = {title: s for title, s in spaces.items() if s is not None}
            datasets.append(DatasetView(
                name=ds.name,
                description=(f"data {ds.data}, architecture {ds.arch}, training {ds.train or 'defaults'}, poisoning "
                             f"rate {ds.poison_rate:g}, target label {ds.target}; detectors "
                             f"{', '.join(ds.detectors)}; guard of {', '.join(ds.guard)}."),
                attacks=[(a.name, a.kind, a.method) for a in ds.attacks],
                roc={a: s for a, s in roc.items() if s},
                sensitivity={t: s.lcr for t, s in spaces.items()},
                activation={t: s.embedding for t, s in spaces.items()},
                explained={t: s.explained for t, s in spaces.items()},
                feature={t: s.distances for t, s in spaces.items()},
            ))
        a = self.config.analysis
        adaptive = summarise_adaptive(self.adaptive_results()[0]) if self.adaptive_cells() else []
        return StudyView(adaptive=adaptive, cells=done, missing=[c.label for c in missing], seeds=list(self.config.seeds),
                         fpr=self.config.fpr, analysis_seed=seed, mutants=a.mutants, embedding=a.embedding,
                         n_per_kind=a.n, datasets=datasets)

    def build_report(self) -> Path:
        """The offline HTML report (PNG plots beside it) under OUT/report/; returns the page's path."""
        return build_report(self.report_view(), self.layout.report_dir)


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
    """The study recorded in an output folder (the config of its latest run), to rebuild tables or the report
    (a network of one's own need not be importable for that)."""
    raw, base_dir = StudyLayout(out_dir).recorded_config()
    return Study(parse_config(raw, base_dir=base_dir, import_factories=False), out_dir, progress, log)
