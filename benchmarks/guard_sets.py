"""Which detectors should the guard combine? Every candidate set, re-combined from a study's cached scores.

The guard turns each detector's score into a p-value against clean calibration scores and adds them up by
Fisher's method (`malex.guard`). A finished study folder already holds, for every model, each detector's
scores on the clean calibration pool and on the clean test inputs, and for every cell its scores on the
malicious inputs. That is all a Fisher combination needs, so any set of the study's detectors can be judged
as a guard on every dataset, attack and seed without fitting anything again:

    python benchmarks/guard_sets.py malex-out/study-mnist-gtsrb malex-out/study-cifar10-cpu

The re-combined guard differs from the study's fitted guard in one way: its detectors were fitted on the
study's fit pool and calibrated on its calibration pool (the fitted guard splits the two pools' union
itself). The default set is re-combined too, and its AUROC is printed beside the fitted guard's, so the
size of that difference is on the page. Prints the tables and writes them as Markdown (--out).
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from malex.calibration import calibrate
from malex.metrics import auroc, tpr_at_fpr
from malex.report import aggregate
from malex.evaluate.study.cache import StudyLayout, read_json, read_tensors
from malex.guard import GuardConfig
from malex.guard.guard import combine_pvalues
from malex.guard.pvalues import in_sample_tail_pvalues, tail_pvalues
from malex.progress import track

DEFAULT = GuardConfig.detectors
#: candidate sets, by name; "+x" adds x to the default set
CANDIDATES: dict[str, tuple[str, ...]] = {
    "default": DEFAULT,
    "+msp": DEFAULT + ("msp",),
    "+squeeze": DEFAULT + ("squeeze",),
    "+msp+squeeze": DEFAULT + ("msp", "squeeze"),
    "kd_bu+mahalanobis+msp": ("kd_bu", "mahalanobis", "msp"),
    "all": (),  # filled per dataset: every detector the study ran
}


@dataclass(frozen=True)
class CellScores:
    """One finished cell's per-detector scores: calibration, clean test and malicious, by detector."""

    dataset: str
    attack: str
    kind: str
    seed: int
    calibration: dict[str, np.ndarray]
    clean: dict[str, np.ndarray]
    malicious: dict[str, np.ndarray]
    fitted_guard_auroc: float | None


def load_cells(root: Path) -> list[CellScores]:
    """Every finished cell of the study folder `root` whose scores are all readable."""
    layout = StudyLayout(root)
    layout.require_study()
    cells = []
    for metrics_path in track(sorted(root.glob("cells/*/*/seed*/metrics.json")), f"reading {root}"):
        m = read_json(metrics_path)
        if m is None or not m.get("rows"):
            continue
        detectors = [r["detector"] for r in m["rows"] if r["detector"] != "guard"]
        guard_rows = [r for r in m["rows"] if r["detector"] == "guard"]
        cal, clean, mal = {}, {}, {}
        for det in detectors:
            fit = read_tensors(layout.fit(m["dataset"], m["seed"], m["model"], det))
            got = read_tensors(layout.cell_scores(m["dataset"], m["attack"], m["seed"], det))
            if fit is None or got is None:
                break
            cal[det], clean[det] = fit[1]["calibration"].numpy(), fit[1]["clean"].numpy()
            mal[det] = got[1]["scores"].numpy()
        else:
            cells.append(CellScores(m["dataset"], m["attack"], m["kind"], m["seed"], cal, clean, mal,
                                    guard_rows[0]["auroc"] if guard_rows else None))
    return cells


def cell_pvalues(cell: CellScores) -> dict[str, dict[str, np.ndarray]]:
    """Per detector, the p-values of the calibration inputs (each against the others), of the clean test
    inputs and of the malicious inputs against the calibration scores, as the guard computes them."""
    return {d: {"calibration": in_sample_tail_pvalues(cal), "clean": tail_pvalues(cal, cell.clean[d]),
                "malicious": tail_pvalues(cal, cell.malicious[d])} for d, cal in cell.calibration.items()}


def recombine(pvalues: dict[str, dict[str, np.ndarray]], detectors: tuple[str, ...], fpr: float
              ) -> dict[str, float]:
    """The Fisher guard of `detectors` on one cell: AUROC, TPR at 1% FPR, and at its calibrated threshold
    the clean inputs flagged and the malicious inputs caught."""
    guard = {part: combine_pvalues({d: pvalues[d][part] for d in detectors})
             for part in ("calibration", "clean", "malicious")}
    threshold = calibrate(guard["calibration"], fpr)
    clean, mal = guard["clean"], guard["malicious"]
    return {"auroc": auroc(clean, mal), "tpr1": tpr_at_fpr(clean, mal, 0.01),
            "clean_fpr": float(np.mean(threshold.flags(clean))), "caught": float(np.mean(threshold.flags(mal)))}


def mean_std(values: list[float]) -> str:
    """'mean ± sample std' over seeds, as the study's own tables write it."""
    return aggregate.fmt(*aggregate.mean_std(values))


#: per (dataset, attack, kind), per candidate set, one result per seed
Results = dict[tuple[str, str, str], dict[str, list[dict[str, float]]]]


def summary_table(results: Results, names: list[str]) -> str:
    """Per set: mean AUROC over the backdoor and the adversarial cells, the worst cell, and at the threshold
    the clean FPR and the share of malicious inputs caught."""
    header = ["set", "detectors", "mean AUROC, backdoor cells", "mean AUROC, adversarial cells",
              "worst cell AUROC", "clean FPR at the threshold", "malicious caught"]
    rows = []
    for s in names:
        runs = {k: v[s] for k, v in results.items() if s in v}
        every = [r for v in runs.values() for r in v]
        by_kind = {kind: [r["auroc"] for (_, _, k), v in runs.items() if k == kind for r in v]
                   for kind in ("backdoor", "adversarial")}
        rows.append([s, ", ".join(CANDIDATES[s]) or "every detector of the study",
                     f"{np.mean(by_kind['backdoor']):.3f}", f"{np.mean(by_kind['adversarial']):.3f}",
                     f"{min(r['auroc'] for r in every):.3f}", mean_std([r["clean_fpr"] for r in every]),
                     f"{np.mean([r['caught'] for r in every]):.3f}"])
    return aggregate.markdown_table(header, rows)


def dataset_table(results: Results, names: list[str]) -> str:
    """Per set and dataset: mean AUROC over the backdoor cells / over the adversarial cells."""
    datasets = list(dict.fromkeys(d for d, _, _ in results))
    rows = []
    for s in names:
        row = [s]
        for ds in datasets:
            means = [np.mean([r["auroc"] for (d, _, k), v in results.items() if d == ds and k == kind
                              for r in v.get(s, [])]) for kind in ("backdoor", "adversarial")]
            row.append(" / ".join(f"{m:.3f}" for m in means))
        rows.append(row)
    return aggregate.markdown_table(["set"] + [f"{ds}: backdoor / adversarial" for ds in datasets], rows)


def cell_table(results: Results, names: list[str]) -> str:
    """Per cell: AUROC and TPR at 1% FPR of every set, mean ± std over seeds."""
    header = ["dataset", "attack", "seeds"] + [f"{n}: AUROC / TPR@1%" for n in names]
    rows = [[dataset, f"{attack} ({kind})", str(len(by_set["default"]))] + [
        f"{mean_std([r['auroc'] for r in by_set[s]])} / {mean_std([r['tpr1'] for r in by_set[s]])}"
        if s in by_set else "–" for s in names] for (dataset, attack, kind), by_set in results.items()]
    return aggregate.markdown_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("studies", nargs="+", type=Path, help="finished (or partly finished) study folders")
    parser.add_argument("--fpr", type=float, default=0.05, help="the guard's target false-positive rate")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/guard_sets.md"))
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)

    cells = [c for root in args.studies for c in load_cells(root)]
    if not cells:
        print("no finished cells in " + ", ".join(map(str, args.studies)), file=sys.stderr)
        return 2
    names = list(CANDIDATES)
    results: Results = {}
    gaps = []
    for cell in track(cells, "re-combining guards"):
        pvalues = cell_pvalues(cell)
        for name in names:
            dets = CANDIDATES[name] or tuple(cell.calibration)
            if not set(dets) <= set(cell.calibration):
                continue
            r = recombine(pvalues, dets, args.fpr)
            results.setdefault((cell.dataset, cell.attack, cell.kind), {}).setdefault(name, []).append(r)
            if name == "default" and cell.fitted_guard_auroc is not None:
                gaps.append(r["auroc"] - cell.fitted_guard_auroc)
    gap = np.abs(gaps)
    text = "\n\n".join([
        f"# Guard detector sets, re-combined from cached study scores\n\n"
        f"`python {shlex.join(['benchmarks/guard_sets.py'] + argv)}` on "
        f"{dt.date.today().isoformat()}: {len(cells)} finished cells from {', '.join(map(str, args.studies))}; "
        f"target FPR {args.fpr}.",
        "## Summary over all cells\n\n" + summary_table(results, names),
        "## Mean AUROC by dataset\n\n" + dataset_table(results, names),
        "## Per cell (mean ± std over seeds)\n\n" + cell_table(results, names),
        f"Re-combined default set against the study's fitted guard: AUROC differs by {gap.mean():.4f} on average "
        f"(largest {gap.max():.4f}) over {len(gap)} cells." if len(gap) else "",
    ])
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
