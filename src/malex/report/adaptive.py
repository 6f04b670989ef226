"""The adaptive attacks' tables and plot: attacker success per budget, for the guard and each member attacked
alone, beside plain PGD's at the same budget, from plain rows (one per dataset, attack, seed, budget and target,
as the study's `adaptive_rows` gives them).

Attacker success: the share of sources whose adversarial example both fools the model and passes the target at
its calibrated threshold. Means and sample std over seeds ("–" with one seed), as the study's other tables.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from malex.atomic import atomic_write_bytes  # noqa: E402
from malex.report.aggregate import _csv_text, _ordered, fmt, markdown_table, mean_std  # noqa: E402
from malex.report.analysis_plots import _save  # noqa: E402

#: the per-seed CSV's columns (adaptive.csv)
CSV_FIELDS = ("dataset", "attack", "method", "seed", "scale", "eps", "target", "n", "success", "fooled", "flagged",
              "guard_success", "plain_success", "plain_fooled", "plain_flagged")
#: the shares averaged over seeds
SHARES = ("success", "fooled", "flagged", "guard_success", "plain_success")


def write_adaptive_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """One CSV row per (dataset, attack, seed, budget, target)."""
    return atomic_write_bytes(path, _csv_text(CSV_FIELDS, rows).encode())


def summarise_adaptive(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (dataset, attack, budget, target): every share's (mean, std) over the seeds."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["dataset"], r["attack"], r["method"], r["scale"], r["eps"], r["target"])].append(r)
    out = []
    for (dataset, attack, method, scale, eps, target), members in groups.items():
        entry: dict[str, Any] = {"dataset": dataset, "attack": attack, "method": method, "scale": scale, "eps": eps,
                                 "target": target, "seeds": sorted(m["seed"] for m in members),
                                 "n": mean_std([m["n"] for m in members])}
        for key in SHARES:
            entry[key] = mean_std([m[key] for m in members])
        out.append(entry)
    return out


def adaptive_table(summary: Sequence[dict[str, Any]], dataset: str, attack: str
                   ) -> tuple[list[str], list[list[str]]]:
    """Rows: target x budget; columns: plain PGD's and the adaptive attack's attacker success, the adaptive
    attack's fooled and flagged shares, and (aimed at a member) the share that also passes the whole guard."""
    header = ["target", "eps", "plain PGD success", "adaptive success", "fooled", "flagged by target",
              "passes the guard too"]
    body = [[s["target"], f"{s['eps']:.4g} ({s['scale']:g} x)", fmt(*s["plain_success"]), fmt(*s["success"]),
             fmt(*s["fooled"]), fmt(*s["flagged"]), fmt(*s["guard_success"])]
            for s in summary if s["dataset"] == dataset and s["attack"] == attack]
    return header, body


def attacks_of(summary: Sequence[dict[str, Any]], dataset: str) -> list[tuple[str, str]]:
    """(attack, method) of the dataset's adaptive attacks, in order."""
    return _ordered((s["attack"], s["method"]) for s in summary if s["dataset"] == dataset)


DESCRIPTION = ("Attacker success: the share of correctly classified attack sources whose adversarial example fools "
               "the clean model AND passes the target at its calibrated threshold (target 'guard': the guard fitted "
               "in that (dataset, seed); a member's name: that member alone, its own threshold at the study's FPR). "
               "Plain PGD (40 steps of eps / 30) ignores the guard; the adaptive attack is aimed at the target "
               "(feature matching at none). 'passes the guard too': an attack aimed at one member, screened by the "
               "whole guard. Mean ± sample std over seeds.")


def adaptive_markdown(summary: Sequence[dict[str, Any]], missing: Sequence[str] = ()) -> str:
    """The results.md section of the adaptive attacks."""
    lines = ["## Adaptive attacks: attacker success", "", DESCRIPTION, ""]
    for dataset in _ordered(s["dataset"] for s in summary):
        for attack, method in attacks_of(summary, dataset):
            lines += [f"### {dataset} / {attack} ({method})", "",
                      markdown_table(*adaptive_table(summary, dataset, attack)), ""]
    if missing:
        lines += ["Adaptive attacks not finished:", ""] + [f"- {label}" for label in missing] + [""]
    return "\n".join(lines)


def plot_attacker_success(summary: Sequence[dict[str, Any]], dataset: str, path: str | Path) -> Path:
    """One panel per adaptive attack of `dataset`: attacker success against the budget (eps), one colour per
    target, the adaptive attack solid and plain PGD dashed, error bars the std over seeds."""
    attacks = attacks_of(summary, dataset)
    fig, axes = plt.subplots(1, len(attacks), figsize=(4.6 * len(attacks), 3.8), squeeze=False)
    for ax, (attack, method) in zip(axes[0], attacks):
        rows = [s for s in summary if s["dataset"] == dataset and s["attack"] == attack]
        for i, target in enumerate(_ordered(s["target"] for s in rows)):
            mine = sorted((s for s in rows if s["target"] == target), key=lambda s: s["eps"])
            eps = [s["eps"] for s in mine]
            for key, style, label in (("success", "-", method), ("plain_success", "--", "plain PGD")):
                mean = np.array([s[key][0] for s in mine])
                std = np.nan_to_num(np.array([s[key][1] for s in mine]))
                ax.errorbar(eps, mean, yerr=std, color=f"C{i}", ls=style, marker="o", ms=3, capsize=2,
                            label=f"{target}: {label}")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"{attack} ({method})")
        ax.set_xlabel("budget (Linf eps)")
        ax.set_ylabel("attacker success")
        ax.legend(fontsize=7)
    return _save(fig, path)
