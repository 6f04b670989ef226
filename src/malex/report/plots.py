"""Plots of the three spaces and of detection quality, written as PNG files."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

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
