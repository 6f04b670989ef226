"""Plots of the three spaces and of detection quality, written as PNG files."""

from __future__ import annotations

from pathlib import Path
import math
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from malex.metrics import roc  # noqa: E402

#: colour families per input kind; several attacks of one kind take successive shades
KIND_COLOURS = {
    "benign": ("tab:green",),
    "adversarial": ("tab:red", "tab:orange", "tab:brown", "tab:pink"),
    "backdoor": ("tab:purple", "tab:blue", "tab:cyan", "tab:olive"),
}


def _colours(kinds: list[str]) -> list[str]:
    """A colour per kind: its family's next shade, or a default cycle colour for other names."""
    used = {family: 0 for family in KIND_COLOURS}
    out = []
    for i, kind in enumerate(kinds):
        family = next((f for f in KIND_COLOURS if kind.startswith(f)), None)
        if family is None:
            out.append(f"C{i}")
            continue
        shades = KIND_COLOURS[family]
        out.append(shades[used[family] % len(shades)])
        used[family] += 1
    return out


def plot_lcr_histograms(panels: Mapping[str, Mapping[str, np.ndarray]], path: str | Path,
                        thresholds: Mapping[str, float] | None = None) -> Path:
    """One panel per mutation strength; in each, the LCR histogram of every input kind.

    `panels` maps a panel title (e.g. "r = 0.30") to {kind: LCR values}; `thresholds` optionally maps the
    same titles to the calibrated LCR threshold, drawn as a dashed line.
    """
    path = Path(path)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    bins = np.linspace(0, 1, 26)
    for ax, (title, kinds) in zip(axes[0], panels.items()):
        for colour, (kind, values) in zip(_colours(list(kinds)), kinds.items()):
            ax.hist(values, bins=bins, alpha=0.45, density=True, label=f"{kind} (n={len(values)})", color=colour)
        if thresholds and title in thresholds:
            ax.axvline(thresholds[title], color="black", ls="--", lw=1, label="calibrated threshold")
        ax.set_title(title)
        ax.set_xlabel("label-change rate under mutation")
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_roc_curves(curves: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]], path: str | Path) -> Path:
    """One panel per attack; in each, the ROC curve of every detector from (clean, malicious) scores."""
    path = Path(path)
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 4), squeeze=False)
    for ax, (attack, detectors) in zip(axes[0], curves.items()):
        for name, (clean, malicious) in detectors.items():
            fpr, tpr = roc(clean, malicious)
            ax.plot(fpr, tpr, label=name)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
        ax.set_title(attack)
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_confusion_matrices(panels: Mapping[str, tuple[Sequence[str], np.ndarray]], path: str | Path,
                            columns: int = 4) -> Path:
    """One panel per title: a confusion matrix (rows true, columns predicted, in `labels` order), coloured by
    the share of its row and annotated with the counts; rows without inputs are left blank."""
    path = Path(path)
    n = len(panels)
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.1 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (title, (labels, matrix)) in zip(axes.flat, panels.items()):
        m = np.asarray(matrix, dtype=np.float64)
        totals = m.sum(axis=1, keepdims=True)
        share = np.divide(m, totals, out=np.full_like(m, np.nan), where=totals > 0)
        ax.imshow(np.ma.masked_invalid(share), cmap="Blues", vmin=0, vmax=1)
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if totals[i, 0] > 0:
                    ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=8,
                            color="white" if share[i, j] > 0.6 else "black")
        ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=20)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("verdict", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
