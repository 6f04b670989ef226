"""A scan of a large source into a folder of parts: plan the parts, skip those already written, screen the rest
on this machine (one part in memory at a time) or on Ray, and say what was done and what was retried."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from malex.cluster import import_ray
from malex.data.shards import list_shards
from malex.errors import ConfigError
from malex.guard.spec import GuardSpec
from malex.models.sources import file_sha256
from malex.progress import counter
from malex.scan.folder import ScanFolder, check_format
from malex.scan.parts import DEFAULT_PART_SIZE, plan_parts
from malex.scan.screen import PartDone, process_part

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class ScanSettings:
    """How to scan: output format, inputs per part, where (`ray`: None on this machine, else a Ray address,
    'local' for a private instance), how many actors, whether to draw a bar, whether to start over, and whether
    images of another size are resized to the model's (else refused)."""

    fmt: str = "parquet"
    part_size: int = DEFAULT_PART_SIZE
    ray: str | None = None
    actors: int = 2
    progress: bool = True
    force: bool = False
    resize: bool = False


@dataclass
class ScanReport:
    """What a scan did: parts and inputs in all, those written by an earlier run, those computed now, the parts
    begun more than once (part -> the workers that began it, oldest first), and the time taken."""

    folder: Path
    parts: int
    inputs: int
    skipped_parts: int
    computed: list[PartDone] = field(default_factory=list)
    retried: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def computed_inputs(self) -> int:
        return sum(d.rows for d in self.computed)

    @property
    def flagged(self) -> int:
        return sum(d.flagged for d in self.computed)

    def _per_worker(self, field_name: str) -> dict[str, float]:
        most: dict[str, float] = {}
        for d in self.computed:
            most[d.worker] = max(most.get(d.worker, 0.0), getattr(d, field_name))
        return most

    def peak_rss_mib(self) -> dict[str, float]:
        """Each worker's peak resident memory (MiB), as its last finished part reported it."""
        return self._per_worker("peak_rss_mib")

    def cpu_seconds(self) -> dict[str, float]:
        """Each worker's CPU time (s) up to its last finished part, its start and the guard's loading included."""
        return self._per_worker("cpu_s")


def manifest(spec: GuardSpec, shards: list, settings: ScanSettings) -> dict:
    """What a scan folder is a scan of: the source's files and counts, the guard and model files' digests, and
    the part size and format (a rerun resumes only the same scan)."""
    return {"malex_scan": MANIFEST_VERSION, "format": settings.fmt, "part_size": settings.part_size,
            "resize": settings.resize,
            "guard_sha256": file_sha256(Path(spec.guard_file)), "model_sha256": file_sha256(Path(spec.model.path)),
            "source": [[s.path, s.kind, s.key, s.rows] for s in shards]}


def scan_to_folder(source: str, spec: GuardSpec, out: Path, settings: ScanSettings = ScanSettings()) -> ScanReport:
    """Screen every input of `source` (`malex.data.shards.source_files`) with the guard `spec` names, writing one
    file of rows per part into `out`; a rerun writes only the parts that have no file yet."""
    began = time.perf_counter()
    folder = ScanFolder(Path(out), check_format(settings.fmt))
    if settings.ray is not None:
        import_ray()  # without Ray: one line naming the extra, before any work
    guard = spec.load()  # here too under Ray: a bad guard, model or key is one line before any actor starts
    if guard.input_shape is None:
        raise ConfigError(f"{spec.model.path} records no input shape and neither does the guard; give --input-shape")
    shards = list_shards(source)
    parts = plan_parts(shards, settings.part_size)
    folder.open(manifest(spec, shards, settings), force=settings.force)
    pending = [p for p in parts if not folder.done(p.name)]
    report = ScanReport(folder.path, len(parts), sum(s.rows for s in shards), len(parts) - len(pending))
    with counter("screening", sum(len(p) for p in pending), enabled=settings.progress) as advance:
        if settings.ray is None:
            for part in pending:
                report.computed.append(process_part(guard, part, folder, settings.resize))
                advance(len(part))
        elif pending:  # nothing left to do starts no Ray
            from malex.scan.on_ray import run_on_ray

            del guard  # the actors load their own
            report.computed = run_on_ray(spec, pending, folder, settings.ray, settings.actors, advance,
                                         resize=settings.resize)
    attempts = folder.attempts()
    finished = [d.name for d in report.computed]
    report.retried = {name: attempts[name] for name in finished if len(attempts.get(name, ())) > 1}
    folder.forget_attempts(finished)
    report.seconds = time.perf_counter() - began
    return report
