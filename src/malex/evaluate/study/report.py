"""The study's report: one offline HTML page (OUT/report/index.html) with its PNG plots beside it.

Per dataset: the models and attacks, the metrics tables (mean ± std over seeds), the ROC curves of every
detector and the guard per attack (analysis seed), and the three spaces of the study: sensitivity (LCR
under mutation across strengths), activation (2-D embeddings of layer activations) and feature space
(per-layer Mahalanobis distances). Everything is read from the study's cache; nothing is recomputed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from malex.evaluate.study.aggregate import (
    METRICS, attack_table, attacks_table, auroc_matrix, model_summary, models_table, attack_summary, summarise,
)
from malex.evaluate.study.config import CLEAN_MODEL
from malex.report.analysis_plots import plot_activation_space, plot_feature_space, plot_roc_grid, plot_sensitivity
from malex.report.html import HtmlPage

if TYPE_CHECKING:
    from pathlib import Path

    from malex.evaluate.study.runner import Study


def _model_title(key: str) -> str:
    return "clean model" if key == CLEAN_MODEL else f"{key}-poisoned model"


def build_report(study: "Study") -> "Path":
    """Write OUT/report/index.html and its plots from what the study has finished; returns the page."""
    from malex.evaluate.study.runner import Cell

    config = study.config
    out = study.layout.report_dir
    out.mkdir(parents=True, exist_ok=True)
    cells, missing = study.results()
    summary = summarise(cells)
    done = {(c["dataset"], c["attack"], c["seed"]) for c in cells}
    models, attacks = model_summary(cells), attack_summary(cells)
    seed = config.analysis_seed

    page = HtmlPage("malex study report")
    page.paragraph(
        f"Grid: {len(config.datasets)} dataset(s) x their attacks x detectors x seeds "
        f"{', '.join(map(str, config.seeds))}; {len(cells)} cell(s) finished, {len(missing)} not. Clean inputs are "
        "correctly classified test inputs; malicious inputs are successful attacks only. Tables give the mean ± "
        "sample std over seeds. AUROC and TPR at 1% / 5% FPR are threshold-free on the clean test scores; "
        f"'caught', 'clean FPR' and 'detection acc.' use each detector's threshold set at {config.fpr:.0%} FPR on "
        "a separate clean split (the guard: its own calibrated verdicts).")
    if missing:
        page.paragraph("Cells not finished: " + "; ".join(c.label for c in missing), note=True)

    for ds in config.datasets:
        page.heading(f"{ds.name}")
        page.paragraph(f"data {ds.data}, architecture {ds.arch}, training {ds.train or 'defaults'}, poisoning rate "
                       f"{ds.poison_rate:g}, target label {ds.target}; detectors {', '.join(ds.detectors)}; guard "
                       f"of {', '.join(ds.guard)}.", note=True)
        page.heading("Models and attacks", 3)
        page.table(*models_table(models, ds.name))
        page.table(*attacks_table(attacks, ds.name))
        page.heading("AUROC", 3)
        page.table(*auroc_matrix(summary, ds.name))
        for attack in ds.attacks:
            header, body = attack_table(summary, ds.name, attack.name)
            if body:
                page.heading(f"{attack.name} ({attack.kind}, {attack.method})", 3)
                page.table(header, body)

        curves = {}
        for attack in ds.attacks:
            finished = (ds.name, attack.name, seed) in done
            scores = study.cell_scores(Cell(ds.name, attack.name, seed)) if finished else {}
            if scores:
                curves[attack.name] = scores
        if curves:
            name = f"{ds.name}-roc.png"
            plot_roc_grid(curves, out / name)
            page.heading("ROC curves", 3)
            page.image(name, f"ROC curves of every detector and the guard per attack on {ds.name}, seed {seed}.")

        spaces = {key: study.analysis(ds, key) for key in ds.model_keys}
        spaces = {_model_title(k): v for k, v in spaces.items() if v is not None}
        if not spaces:
            continue
        page.heading("Sensitivity space", 3)
        name = f"{ds.name}-sensitivity.png"
        plot_sensitivity({t: s.lcr for t, s in spaces.items()}, out / name)
        page.image(name, "Label-change rate (LCR) of each input under Gaussian fuzzing of the dense layers, "
                         f"{config.analysis.mutants} mutants per strength r, seed {seed}. First column: median and "
                         "interquartile range against r; then one histogram per r. Adversarial inputs flip label "
                         "at a mild r; backdoor inputs resist a strong one.")
        page.heading("Activation space", 3)
        name = f"{ds.name}-activation.png"
        method = config.analysis.embedding
        plot_activation_space({t: s.embedding for t, s in spaces.items()}, out / name, method,
                              {t: s.explained for t, s in spaces.items()})
        page.image(name, f"2-D {method.upper()} embedding of each layer's activations (flattened); PCA is fitted on "
                         f"the benign inputs; at most {config.analysis.n} inputs per kind.")
        page.heading("Feature space", 3)
        name = f"{ds.name}-feature.png"
        plot_feature_space({t: s.distances for t, s in spaces.items()}, out / name)
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
