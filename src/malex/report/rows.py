"""Per-input result rows as CSV or JSON lines."""

from __future__ import annotations

import csv
import json
from typing import IO, Sequence


def write_rows(rows: Sequence[dict], handle: IO[str], fmt: str = "csv") -> None:
    """Write `rows` (dicts with the same keys) to `handle` as 'csv' or 'jsonl'."""
    if fmt == "jsonl":
        for row in rows:
            handle.write(json.dumps(row) + "\n")
        return
    if not rows:
        return
    writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
