"""One part screened by a guard and written to its output file: the step the local scan and every Ray actor run."""

from __future__ import annotations

import os
import resource
import socket
from dataclasses import dataclass

import numpy as np

from malex.guard import BENIGN, Guard
from malex.scan.folder import ScanFolder
from malex.scan.parts import Part


@dataclass(frozen=True)
class PartDone:
    """What screening one part gave: its name, inputs, flagged inputs, the worker, and the worker's peak memory
    and CPU time (user + system) so far."""

    name: str
    rows: int
    flagged: int
    worker: str
    peak_rss_mib: float
    cpu_s: float


def worker_name() -> str:
    """This process as host:pid (a Ray actor restarted after a crash gets a new one)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """This process's CPU time so far (user + system, every thread)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def screen_columns(guard: Guard, part: Part, resize: bool = False) -> dict[str, list | np.ndarray]:
    """The output columns of one part: source file, row, prediction, verdict, guard score, each detector's score
    (`resize`: images of another size are resized to the model's)."""
    sources, rows, x = part.read(guard.input_shape, resize)
    result = guard.screen(x)
    return {"source": sources, "index": rows, "prediction": result.prediction.astype(np.int64),
            "verdict": list(result.verdict), "guard_score": result.guard_score.astype(np.float64),
            **{name: np.asarray(scores, dtype=np.float64) for name, scores in result.scores.items()}}


def process_part(guard: Guard, part: Part, folder: ScanFolder, resize: bool = False) -> PartDone:
    """Record the attempt, screen `part`, write its output file (atomically, under its own name: a part done
    twice is written twice with the same rows, never appended), and say what it gave."""
    worker = worker_name()
    folder.begin(part.name, worker)
    columns = screen_columns(guard, part, resize)
    folder.write(part.name, columns)
    flagged = sum(v != BENIGN for v in columns["verdict"])
    return PartDone(part.name, len(part), int(flagged), worker, peak_rss_mib(), cpu_seconds())
