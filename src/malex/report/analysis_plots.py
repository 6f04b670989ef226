"""Plots of the study's three spaces, one figure per dataset with one row per model, written as PNG files.

Each takes {row title: {panel key: {kind: values}}}; kinds are named "benign", "adversarial: ..." or
"backdoor: ..." and keep one colour per kind across a figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from malex.report.plots import _colours  # noqa: E402

Kinds = Mapping[str, np.ndarray]


def _palette(rows: Mapping[str, Mapping[object, Kinds]]) -> dict[str, str]:
    kinds = list(dict.fromkeys(k for panels in rows.values() for per_kind in panels.values() for k in per_kind))
    return dict(zip(kinds, _colours(kinds)))


def _grid(n_rows: int, n_cols: int, width: float = 3.3, height: float = 2.7):
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(width * n_cols, height * n_rows), squeeze=False)
    return fig, axes


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_sensitivity(rows: Mapping[str, Mapping[float, Kinds]], path: str | Path) -> Path:
    """Label-change rates under mutation. Per row (a model): first the median LCR against the mutation
    strength r with the interquartile band, per kind; then one LCR histogram per strength."""
    strengths = sorted({r for panels in rows.values() for r in panels})
    colours = _palette(rows)
    fig, axes = _grid(len(rows), 1 + len(strengths))
    bins = np.linspace(0, 1, 21)
    for ax_row, (title, panels) in zip(axes, rows.items()):
        curve = ax_row[0]
        kinds = list(dict.fromkeys(k for per_kind in panels.values() for k in per_kind))
        for kind in kinds:
            rs = [r for r in strengths if r in panels and len(panels[r].get(kind, ()))]
            if not rs:
                continue
            q = np.array([np.percentile(panels[r][kind], [25, 50, 75]) for r in rs])
            curve.plot(rs, q[:, 1], marker="o", color=colours[kind], label=kind)
            curve.fill_between(rs, q[:, 0], q[:, 2], color=colours[kind], alpha=0.15)
        curve.set_xscale("log")
        curve.set_xticks(strengths, [f"{r:g}" for r in strengths])
        curve.xaxis.set_minor_formatter(NullFormatter())
        curve.set_ylim(-0.02, 1.02)
        curve.set_xlabel("mutation strength r")
        curve.set_ylabel("LCR (median, IQR)")
        curve.set_title(title, fontsize=9)
        curve.legend(fontsize=7)
        for ax, r in zip(ax_row[1:], strengths):
            for kind, values in panels.get(r, {}).items():
                if len(values):
                    ax.hist(values, bins=bins, density=True, alpha=0.45, color=colours[kind], label=kind)
            ax.set_title(f"{title}: r = {r:g}", fontsize=9)
            ax.set_xlabel("label-change rate")
    return _save(fig, path)


def plot_activation_space(rows: Mapping[str, Mapping[str, Kinds]], path: str | Path, method: str = "pca",
                          explained: Mapping[str, Mapping[str, list[float]]] | None = None) -> Path:
    """2-D embeddings of each layer's activations (columns) per model (rows), coloured by kind."""
    layers = list(dict.fromkeys(layer for panels in rows.values() for layer in panels))
    colours = _palette(rows)
    fig, axes = _grid(len(rows), len(layers))
    for ax_row, (title, panels) in zip(axes, rows.items()):
        for ax, layer in zip(ax_row, layers):
            for kind, z in panels.get(layer, {}).items():
                z = np.asarray(z)
                if len(z):
                    ax.scatter(z[:, 0], z[:, 1], s=5, alpha=0.6, color=colours[kind], label=kind, linewidths=0)
            share = (explained or {}).get(title, {}).get(layer)
            note = f" ({sum(share):.0%} var.)" if share else ""
            ax.set_title(f"{title}\n{layer}{note}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        ax_row[0].legend(fontsize=7, markerscale=2)
    fig.suptitle(f"activation space ({method.upper()})", fontsize=10)
    return _save(fig, path)


def plot_feature_space(rows: Mapping[str, Mapping[str, Kinds]], path: str | Path) -> Path:
    """Per model (rows) and layer (columns): histograms of the smallest squared Mahalanobis distance to a
    class mean, per kind, on a log axis."""
    layers = list(dict.fromkeys(layer for panels in rows.values() for layer in panels))
    colours = _palette(rows)
    fig, axes = _grid(len(rows), len(layers))
    for ax_row, (title, panels) in zip(axes, rows.items()):
        for ax, layer in zip(ax_row, layers):
            per_kind = {k: np.asarray(v, np.float64) for k, v in panels.get(layer, {}).items() if len(v)}
            if per_kind:
                everything = np.concatenate(list(per_kind.values()))
                lo = max(float(everything[everything > 0].min()) if (everything > 0).any() else 1e-6, 1e-9)
                hi = max(float(everything.max()), lo * 10)
                bins = np.logspace(np.log10(lo), np.log10(hi), 30)
                for kind, d in per_kind.items():
                    ax.hist(np.clip(d, lo, hi), bins=bins, weights=np.full(len(d), 1.0 / len(d)), alpha=0.45,
                            color=colours[kind], label=kind)
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"{title}\n{layer}", fontsize=9)
            ax.set_xlabel("min squared Mahalanobis distance")
            ax.set_ylabel("share of inputs")
        ax_row[0].legend(fontsize=7)
    return _save(fig, path)


def plot_roc_grid(curves: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]], path: str | Path,
                  columns: int = 4) -> Path:
    """One panel per attack (wrapped into rows of `columns`); in each, the ROC curve of every detector from
    its (clean, malicious) scores."""
    from malex.metrics import roc

    n = len(curves)
    n_cols = max(1, min(columns, n))
    n_rows = (n + n_cols - 1) // n_cols
    fig, axes = _grid(n_rows, n_cols, width=3.8, height=3.6)
    for ax, (attack, detectors) in zip(axes.flat, curves.items()):
        for i, (name, (clean, malicious)) in enumerate(detectors.items()):
            fpr, tpr = roc(clean, malicious)
            guard = name == "guard"
            ax.plot(fpr, tpr, label=name, lw=2.0 if guard else 1.1, color="black" if guard else f"C{i % 10}",
                    ls="-" if guard or i < 10 else "--")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
        ax.set_title(attack, fontsize=10)
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
        ax.legend(fontsize=6, loc="lower right")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return _save(fig, path)
