"""A scan's output folder: one file per part (Parquet or JSON lines, written atomically under the part's name),
a manifest saying what the folder is a scan of, and a note of every attempt at a part, so that a rerun does only
the parts without a file and says which parts were begun more than once."""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from malex.atomic import atomic_write_bytes
from malex.errors import ConfigError
from malex.report.rows import write_rows

FORMATS = ("parquet", "jsonl")
MANIFEST = "_scan.json"  # pyarrow and pandas skip names starting with _ or . when reading the folder
ATTEMPTS = ".attempts"


def pyarrow_available() -> bool:
    """Whether Parquet can be written (pyarrow is installed)."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def check_format(fmt: str) -> str:
    """`fmt` if the scan can write it, else a one-line `ConfigError`."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r} for a scan folder; expected parquet or jsonl")
    if fmt == "parquet" and not pyarrow_available():
        raise ConfigError("writing Parquet needs pyarrow, which is not installed; install malex's ray extra "
                          "(pip install 'malex[ray]') or pyarrow, or pass --format jsonl")
    return fmt


def _parquet_bytes(columns: dict) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table({k: pa.array(np.asarray(v) if not isinstance(v, list) else v) for k, v in columns.items()}),
                   buffer)
    return buffer.getvalue()


def _jsonl_bytes(columns: dict) -> bytes:
    names = list(columns)
    plain = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in columns.items()}
    rows = [dict(zip(names, values)) for values in zip(*(plain[k] for k in names))]
    text = io.StringIO()
    write_rows(rows, text, "jsonl")
    return text.getvalue().encode()


@dataclass(frozen=True)
class ScanFolder:
    """The folder `path` holding a scan's parts in format `fmt` ('parquet' or 'jsonl')."""

    path: Path
    fmt: str = "parquet"

    def file(self, part: str) -> Path:
        return self.path / f"{part}.{self.fmt}"

    def done(self, part: str) -> bool:
        """Whether the part's file is there (files appear whole, by rename, or not at all)."""
        return self.file(part).is_file()

    def write(self, part: str, columns: dict) -> Path:
        """The part's rows, from `columns` (name -> one value per input), as its file."""
        data = _parquet_bytes(columns) if self.fmt == "parquet" else _jsonl_bytes(columns)
        return atomic_write_bytes(self.file(part), data)

    def open(self, manifest: dict, *, force: bool = False) -> None:
        """Start or resume a scan described by `manifest` (JSON-able): refuse a folder holding a scan of other
        inputs, another guard or other parts unless `force`, which first removes that scan's files (and only
        them: the manifest, part files, attempt notes)."""
        here = self.path / MANIFEST
        if here.is_file():
            try:
                recorded = json.loads(here.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                recorded = None
            if recorded != manifest:
                if not force:
                    raise ConfigError(f"{self.path} holds a scan of other inputs, another guard or model, or other "
                                      "settings; give another output folder, or --force to start that scan over")
                self.clear()
        elif self.path.is_dir() and any(self.path.glob("part-*")):
            if not force:
                raise ConfigError(f"{self.path} holds part files but no {MANIFEST}; give another output folder, or "
                                  "--force to replace them")
            self.clear()
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(here, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())

    def clear(self) -> None:
        """Remove this scan's files: the manifest, every part file of either format and the attempt notes."""
        for pattern in [MANIFEST, "part-*.parquet", "part-*.jsonl", f"{ATTEMPTS}/*"]:
            for f in self.path.glob(pattern):
                f.unlink()

    def begin(self, part: str, worker: str) -> None:
        """Note that `worker` has begun `part` (an empty file named for both and the time, so that a worker
        beginning a part twice leaves two notes)."""
        notes = self.path / ATTEMPTS
        notes.mkdir(exist_ok=True)
        (notes / f"{part}@{worker.replace('/', '_').replace('@', '_')}@{time.time_ns()}").touch()

    def attempts(self) -> dict[str, list[str]]:
        """The workers that began each part (in the order of their notes' times)."""
        found: dict[str, list[str]] = {}
        notes = self.path / ATTEMPTS
        if notes.is_dir():
            for f in sorted(notes.iterdir(), key=lambda f: int(f.name.rpartition("@")[2] or 0)):
                part, worker, _ = f.name.split("@")
                found.setdefault(part, []).append(worker)
        return found

    def forget_attempts(self, parts: list[str]) -> None:
        """Remove the attempt notes of `parts` (done and reported)."""
        notes = self.path / ATTEMPTS
        for part in parts:
            for f in notes.glob(f"{part}@*"):
                f.unlink()
        if notes.is_dir() and not any(notes.iterdir()):
            notes.rmdir()
