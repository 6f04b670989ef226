"""A study's report: one offline HTML page (index.html) with its PNG plots beside it, drawn from plain data.

Per dataset: the models and attacks, the metrics tables (mean ± std over seeds), the ROC curves of every
detector and the guard per attack (analysis seed), and the three spaces of the study: sensitivity (LCR
under mutation across strengths), activation (2-D embeddings of layer activations) and feature space
(per-layer Mahalanobis distances). `StudyView` holds all of it as results and scores, so the study, a
benchmark or a notebook can draw the same page.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from malex.report.aggregate import (
    METRICS, attack_summary, attack_table, attacks_table, auroc_matrix, floor_sentence, learnt_note, model_summary,
    models_table, summarise, summarise_verdicts, verdict_table,
)
from malex.report.adaptive import DESCRIPTION, adaptive_table, attacks_of, plot_attacker_success
from malex.report.analysis_plots import plot_activation_space, plot_feature_space, plot_roc_grid, plot_sensitivity
from malex.report.html import HtmlPage
from malex.report.plots import plot_confusion_matrices

Scores = Mapping[str, tuple[np.ndarray, np.ndarray]]  # detector or guard -> (clean scores, malicious scores)


@dataclass(frozen=True)
class DatasetView:
    """One dataset's part of the report. `attacks`: (name, kind, method) in grid order; `roc`: per attack, the
    analysis seed's scores; the three spaces keyed by model title (as `SpaceData`'s fields: per strength or
    layer, per kind of input, the values)."""

    name: str
    description: str
    attacks: list[tuple[str, str, str]]
    roc: Mapping[str, Scores] = field(default_factory=dict)
    sensitivity: Mapping[str, Any] = field(default_factory=dict)
    activation: Mapping[str, Any] = field(default_factory=dict)
    explained: Mapping[str, Any] = field(default_factory=dict)
    feature: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StudyView:
    """The whole report: finished cells' metrics (as metrics.json holds them), the unfinished cells' labels,
    the grid's seeds and target FPR, the analysis settings, and one view per dataset."""

    cells: list[dict[str, Any]]
    missing: list[str]
    seeds: list[int]
    fpr: float
    analysis_seed: int
    mutants: int
    embedding: str
    n_per_kind: int
    datasets: list[DatasetView]
    #: the adaptive attacks' summary rows (`malex.report.adaptive.summarise_adaptive`); empty without any
    adaptive: list[dict[str, Any]] = field(default_factory=list)


def build_report(view: StudyView, out: Path) -> Path:
    """Write out/index.html and its plots; returns the page."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(view.cells)
    models, attacks = model_summary(view.cells), attack_summary(view.cells)
    verdicts = summarise_verdicts(view.cells)
    seed = view.analysis_seed

    page = HtmlPage("malex study report")
    page.paragraph(
        f"Grid: {len(view.datasets)} dataset(s) x their attacks x detectors x seeds "
        f"{', '.join(map(str, view.seeds))}; {len(view.cells)} cell(s) finished, {len(view.missing)} not. Clean "
        "inputs are correctly classified test inputs; malicious inputs are successful attacks only. Tables give the "
        "mean ± sample std over seeds. AUROC and TPR at 1% / 5% FPR are threshold-free on the clean test scores; "
        f"'caught', 'clean FPR' and 'detection acc.' use each detector's threshold set at {view.fpr:.0%} FPR on "
        "a separate clean split (the guard: its own calibrated verdicts). " + floor_sentence(view.cells))
    if view.missing:
        page.paragraph("Cells not finished: " + "; ".join(view.missing), note=True)

    for ds in view.datasets:
        page.heading(f"{ds.name}")
        page.paragraph(ds.description, note=True)
        page.heading("Models and attacks", 3)
        page.table(*models_table(models, ds.name))
        page.table(*attacks_table(attacks, ds.name))
        page.heading("AUROC", 3)
        page.table(*auroc_matrix(summary, ds.name))
        for name, kind, method in ds.attacks:
            header, body = attack_table(summary, ds.name, name)
            if body:
                page.heading(f"{name} ({kind}, {method})", 3)
                page.table(header, body)

        header, body = verdict_table(verdicts, ds.name)
        if body:
            page.heading("The guard's verdicts", 3)
            page.table(header, body)
        panels = {"\n".join(filter(None, (f"{v['attack']} ({v['kind']})", learnt_note(v)))):
                  (v["labels"], v["confusion"])
                  for v in verdicts if v["dataset"] == ds.name and v["confusion"] is not None}
        if panels:
            name = f"{ds.name}-verdicts.png"
            plot_confusion_matrices(panels, out / name)
            page.image(name, "The guard's verdicts on each mixed stream: the cell's clean test inputs and its "
                             "malicious inputs (rows: what they are; columns: the verdict; colour: share of the row; "
                             f"counts summed over seeds {', '.join(map(str, view.seeds))}, a backdoor's seeds "
                             "not learnt left out).")

        if ds.roc:
            name = f"{ds.name}-roc.png"
            plot_roc_grid(ds.roc, out / name)
            page.heading("ROC curves", 3)
            page.image(name, f"ROC curves of every detector and the guard per attack on {ds.name}, seed {seed}.")

        if attacks_of(view.adaptive, ds.name):
            page.heading("Adaptive attacks", 3)
            page.paragraph(DESCRIPTION, note=True)
            name = f"{ds.name}-adaptive.png"
            plot_attacker_success(view.adaptive, ds.name, out / name)
            page.image(name, "Attacker success against the budget: the adaptive attack (solid) and plain PGD (dashed) "
                             "for each target; error bars: std over seeds.")
            for attack, method in attacks_of(view.adaptive, ds.name):
                page.table(*adaptive_table(view.adaptive, ds.name, attack), caption=f"{attack} ({method})")

        if not ds.sensitivity:
            continue
        page.heading("Sensitivity space", 3)
        name = f"{ds.name}-sensitivity.png"
        plot_sensitivity(ds.sensitivity, out / name)
        page.image(name, "Label-change rate (LCR) of each input under Gaussian fuzzing of the dense layers, "
                         f"{view.mutants} mutants per strength r, seed {seed}. First column: median and "
                         "interquartile range against r; then one histogram per r. Adversarial inputs flip label "
                         "at a mild r; backdoor inputs resist a strong one.")
        page.heading("Activation space", 3)
        name = f"{ds.name}-activation.png"
        plot_activation_space(ds.activation, out / name, view.embedding, ds.explained)
        page.image(name, f"2-D {view.embedding.upper()} embedding of each layer's activations (flattened); PCA is "
                         f"fitted on the benign inputs; at most {view.n_per_kind} inputs per kind.")
        page.heading("Feature space", 3)
        name = f"{ds.name}-feature.png"
        plot_feature_space(ds.feature, out / name)
        page.image(name, "Smallest squared Mahalanobis distance to a class mean per layer (tied covariance fitted "
                         "on clean validation inputs; conv maps spatially averaged).")

    page.heading("Columns")
    page.table(["column", "meaning"], [[title, _MEANING[key]] for key, title in METRICS])
    return page.write(out / "index.html")


_MEANING = {
    "auroc": "area under the ROC curve, malicious inputs positive",
    "tpr_at_1fpr": "share of malicious inputs flagged at the threshold that flags 1% of the clean test inputs",
    "tpr_at_5fpr": "the same at 5%",
    "malicious_caught": "share of malicious inputs flagged at the calibrated threshold (guard: its verdicts)",
    "clean_fpr": "share of clean test inputs flagged at the calibrated threshold: the measured false-positive rate",
    "detection_accuracy": "the study's detection accuracy: clean passed and malicious caught, over all inputs",
}
