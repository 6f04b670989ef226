"""Which detectors should the guard combine, and by which rule? Every candidate, re-combined from cached scores.

The guard turns each detector's score into a p-value against clean calibration scores and combines them
(`malex.guard.combine`: Fisher's sum by default, or the Cauchy combination, the harmonic-mean p-value, min-p).
A finished study folder already holds, for every model, each detector's scores on the clean calibration pool
and on the clean test inputs, and for every cell its scores on the malicious inputs. That is all a combination
needs, so any set of the study's detectors under any rule can be judged as a guard on every dataset, attack and
seed without fitting anything again:

    python benchmarks/guard_sets.py malex-out/study-mnist-gtsrb malex-out/study-cifar10-cpu

Per candidate (detector set x rule) and cell: AUROC, TPR at 1% FPR, at the calibrated threshold the clean
inputs flagged and the malicious inputs caught, the malicious inputs flagged AND typed as their kind by the
guard's evidence rule (`malex.guard.verdict.evidence_kinds`), the three-way accuracy on the mixed stream of the
clean test inputs and the cell's malicious inputs, and the gap to the cell's best single member (AUROC of the
guard minus the best AUROC among the set's detectors).

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
from malex.metrics import auroc, tpr_at_fpr, unscored_as_suspicious
from malex.report import aggregate
from malex.evaluate.study.cache import StudyLayout, read_json, read_tensors
from malex.detectors import DETECTORS
from malex.guard import GuardConfig
from malex.guard.combine import COMBINATIONS, DEFAULT_COMBINATION
from malex.guard.guard import combine_pvalues
from malex.guard.pvalues import in_sample_tail_pvalues, tail_pvalues
from malex.guard.verdict import evidence_kinds
from malex.progress import track

DEFAULT = GuardConfig.detectors
#: candidate sets, by name; "+x" adds x to the default set
SETS: dict[str, tuple[str, ...]] = {
    "default": DEFAULT,
    "+msp": DEFAULT + ("msp",),
    "+squeeze": DEFAULT + ("squeeze",),
    "+msp+squeeze": DEFAULT + ("msp", "squeeze"),
    "kd_bu+mahalanobis+msp": ("kd_bu", "mahalanobis", "msp"),
    "all": (),  # filled per dataset: every detector the study ran
}
#: a candidate is a set under a rule, named "set" under Fisher and "set (rule)" otherwise
CANDIDATES: dict[str, tuple[str, str]] = {
    (s if r == DEFAULT_COMBINATION else f"{s} ({r})"): (s, r) for s in SETS for r in COMBINATIONS}


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


def member_aurocs(cell: CellScores) -> dict[str, float]:
    """Each detector's own AUROC on the cell (an input it could not score counts as suspicious)."""
    return {d: auroc(*unscored_as_suspicious(cell.clean[d], cell.malicious[d])[:2]) for d in cell.clean}


def recombine(pvalues: dict[str, dict[str, np.ndarray]], detectors: tuple[str, ...], fpr: float, kind: str,
              rule: str = DEFAULT_COMBINATION, members: dict[str, float] | None = None) -> dict[str, float]:
    """The guard of `detectors` under `rule` on one cell whose malicious inputs are of `kind`: AUROC, TPR at 1%
    FPR, at its calibrated threshold the clean inputs flagged and the malicious inputs caught and caught-and-typed
    right, the three-way accuracy on clean + malicious, and the gap to the best member's AUROC."""
    guard = {part: combine_pvalues({d: pvalues[d][part] for d in detectors}, rule)
             for part in ("calibration", "clean", "malicious")}
    threshold = calibrate(guard["calibration"], fpr)
    clean, mal = guard["clean"], guard["malicious"]
    clean_flagged, mal_flagged = threshold.flags(clean), threshold.flags(mal)
    kinds = evidence_kinds({d: pvalues[d]["malicious"] for d in detectors},
                           {d: DETECTORS[d].evidence for d in detectors})
    typed = mal_flagged & (kinds == kind)
    best = max(members[d] for d in detectors) if members else float("nan")
    n_clean, n_mal = len(clean), len(mal)
    return {"auroc": auroc(clean, mal), "tpr1": tpr_at_fpr(clean, mal, 0.01),
            "clean_fpr": float(np.mean(clean_flagged)), "caught": float(np.mean(mal_flagged)),
            "typed": float(np.mean(typed)), "gap": auroc(clean, mal) - best,
            "mixed": float((np.sum(~clean_flagged) + np.sum(typed)) / (n_clean + n_mal))}


def mean_std(values: list[float]) -> str:
    """'mean ± sample std' over seeds, as the study's own tables write it."""
    return aggregate.fmt(*aggregate.mean_std(values))


#: per (dataset, attack, kind), per candidate set, one result per seed
Results = dict[tuple[str, str, str], dict[str, list[dict[str, float]]]]


def summary_table(results: Results, names: list[str]) -> str:
    """Per set: mean AUROC over the backdoor and the adversarial cells, the worst cell, and at the threshold
    the clean FPR and the share of malicious inputs caught."""
    header = ["candidate", "detectors", "mean AUROC, backdoor cells", "mean AUROC, adversarial cells",
              "worst cell AUROC", "worst gap to best member", "clean FPR at the threshold", "malicious caught",
              "typed right (backdoor / adversarial)", "mixed three-way acc. (mean / worst)"]
    rows = []
    for s in names:
        runs = {k: v[s] for k, v in results.items() if s in v}
        every = [r for v in runs.values() for r in v]
        by_kind = {kind: [r["auroc"] for (_, _, k), v in runs.items() if k == kind for r in v]
                   for kind in ("backdoor", "adversarial")}
        typed = {kind: [r["typed"] for (_, _, k), v in runs.items() if k == kind for r in v]
                 for kind in ("backdoor", "adversarial")}
        set_name, rule = CANDIDATES[s]
        rows.append([s, (", ".join(SETS[set_name]) or "every detector of the study") + f"; {rule}",
                     f"{np.mean(by_kind['backdoor']):.3f}", f"{np.mean(by_kind['adversarial']):.3f}",
                     f"{min(r['auroc'] for r in every):.3f}", f"{min(r['gap'] for r in every):+.3f}",
                     mean_std([r["clean_fpr"] for r in every]), f"{np.mean([r['caught'] for r in every]):.3f}",
                     f"{np.mean(typed['backdoor']):.3f} / {np.mean(typed['adversarial']):.3f}",
                     f"{np.mean([r['mixed'] for r in every]):.3f} / {min(r['mixed'] for r in every):.3f}"])
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


def cell_table(results: Results, names: list[str], metrics: tuple[str, str] = ("auroc", "tpr1"),
               title: str = "AUROC / TPR@1%") -> str:
    """Per cell: two metrics of every candidate in `names`, mean ± std over seeds."""
    header = ["dataset", "attack", "seeds"] + [f"{n}: {title}" for n in names]
    rows = [[dataset, f"{attack} ({kind})", str(max(len(v) for v in by_set.values()))] + [
        " / ".join(mean_std([r[m] for r in by_set[s]]) for m in metrics)
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
        pvalues, members = cell_pvalues(cell), member_aurocs(cell)
        for name in names:
            set_name, rule = CANDIDATES[name]
            dets = SETS[set_name] or tuple(cell.calibration)
            if not set(dets) <= set(cell.calibration):
                continue
            r = recombine(pvalues, dets, args.fpr, cell.kind, rule, members)
            results.setdefault((cell.dataset, cell.attack, cell.kind), {}).setdefault(name, []).append(r)
            if name == "default" and cell.fitted_guard_auroc is not None:
                gaps.append(r["auroc"] - cell.fitted_guard_auroc)
    gap = np.abs(gaps)
    text = "\n\n".join([
        f"# Guard detector sets and combination rules, re-combined from cached study scores\n\n"
        f"`python {shlex.join(['benchmarks/guard_sets.py'] + argv)}` on "
        f"{dt.date.today().isoformat()}: {len(cells)} finished cells from {', '.join(map(str, args.studies))}; "
        f"target FPR {args.fpr}.",
        "## Summary over all cells\n\n" + summary_table(results, names),
        "## Mean AUROC by dataset\n\n" + dataset_table(results, names),
        "## Per cell, the default set under each rule and every set under Fisher (mean ± std over seeds)\n\n"
        + cell_table(results, [n for n in names if CANDIDATES[n][0] == "default" or CANDIDATES[n][1] == "fisher"]),
        "## Per cell: three-way accuracy on the mixed stream / gap to the best member's AUROC, default set\n\n"
        + cell_table(results, [n for n in names if CANDIDATES[n][0] == "default"], ("mixed", "gap"),
                     "three-way acc. / AUROC gap"),
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
