"""Terminal tables of detection metrics."""

from __future__ import annotations

from typing import Iterable, Sequence

from rich.console import Console
from rich.table import Table

from malex.metrics import DetectionMetrics


def metrics_table(rows: Iterable[tuple[str, str, DetectionMetrics]], title: str) -> Table:
    """A table with one row per (detector, attack)."""
    table = Table(title=title, header_style="bold")
    for col in ("detector", "attack", "AUROC", "TPR@1%FPR", "TPR@5%FPR", "clean passed", "malicious caught", "n"):
        table.add_column(col, justify="left" if col in ("detector", "attack") else "right")
    for detector, attack, m in rows:
        table.add_row(detector, attack, f"{m.auroc:.3f}", f"{m.tpr_at_1fpr:.3f}", f"{m.tpr_at_5fpr:.3f}",
                      f"{m.clean_pass:.3f}", f"{m.malicious_caught:.3f}", f"{m.n_clean}/{m.n_malicious}")
    return table


def rows_table(title: str, headers: list[str], rows: Iterable[Iterable[str]]) -> Table:
    """A table of preformatted cells: the first column left-aligned (names), the others right (numbers)."""
    table = Table(title=title)
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def print_table(table: Table, console: Console | None = None) -> None:
    """Print a table to stdout (wide enough not to wrap)."""
    (console or Console(width=max(140, Console().width))).print(table)


def confusion_table(labels: Sequence[str], matrix: Sequence[Sequence[int]], title: str) -> Table:
    """A confusion matrix: one row per true label, one column per predicted label (counts), and each row's
    share predicted right."""
    table = Table(title=title, header_style="bold")
    table.add_column("true \\ verdict", justify="left")
    for label in labels:
        table.add_column(label, justify="right")
    table.add_column("right", justify="right")
    for i, (label, row) in enumerate(zip(labels, matrix)):
        total = sum(row)
        table.add_row(label, *(str(int(v)) for v in row), f"{row[i] / total:.3f}" if total else "–")
    return table


def print_side_by_side(*tables: Table, console: Console | None = None) -> None:
    """Print tables next to each other where the terminal is wide enough (else one below the other)."""
    from rich.columns import Columns

    (console or Console(width=max(140, Console().width))).print(Columns(list(tables), padding=(0, 4)))
