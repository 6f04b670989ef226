"""The scan on Ray: the parts as a Ray Data dataset, screened by a pool of actors that each load the model and the
guard once (`map_batches` with a callable class) and write each part's file themselves. Ray restarts a killed
actor and retries its part; the part's file name is fixed, so a retried part is written once, not twice. Ray is
imported only here, and only when a scan asks for it."""

from __future__ import annotations

from dataclasses import fields
from typing import Callable

import numpy as np

from malex.errors import ConfigError, MalexError
from malex.guard.spec import GuardSpec
from malex.scan.folder import ScanFolder
from malex.scan.parts import Part
from malex.scan.screen import PartDone, process_part

#: object store of a Ray instance a scan starts itself: parts travel as names, so it holds only small summaries
LOCAL_OBJECT_STORE_BYTES = 256 * 1024 * 1024


def import_ray():
    """Ray and Ray Data, or a one-line `ConfigError` naming the extra that brings them."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"--ray needs Ray, which is not installed ({exc}); install malex's ray extra: "
                          "pip install 'malex[ray]'") from exc
    return ray


class PartScreener:
    """A Ray actor's work: load the guard once, then screen each part it is handed and write its file."""

    def __init__(self, spec: GuardSpec, folder: ScanFolder, threads: int = 1) -> None:
        import torch

        torch.set_num_threads(threads)
        self.guard = spec.load()
        self.folder = folder

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        done = [process_part(self.guard, Part.from_json(str(text)), self.folder) for text in batch["part"]]
        return {f.name: np.array([getattr(d, f.name) for d in done]) for f in fields(PartDone)}


def _plain(value):
    """A NumPy scalar as the Python value (strings come back as Python strings already)."""
    return value.item() if isinstance(value, np.generic) else value


def _malex_cause(exc: BaseException) -> MalexError | None:
    """The MalexError an actor raised, inside the exceptions Ray wraps it in."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, MalexError):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None


def start_ray(ray, address: str, actors: int) -> bool:
    """Connect to the cluster at `address` ('auto': the one this machine belongs to), or with 'local' start a
    private Ray instance of `actors` CPUs on this machine; True when this call started or connected it (and the
    scan should shut it down), False when the process was already connected."""
    if ray.is_initialized():
        return False
    if address == "local":
        ray.init(num_cpus=actors, include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                 log_to_driver=False, logging_level="WARNING")
    else:
        ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    return True


def run_on_ray(spec: GuardSpec, parts: list[Part], folder: ScanFolder, address: str, actors: int,
               advance: Callable[[int], None], threads: int = 1) -> list[PartDone]:
    """Screen `parts` with `actors` Ray actors (one CPU each, `threads` torch threads); `advance(n)` as parts
    finish. Returns what each part gave."""
    ray = import_ray()
    if isinstance(actors, bool) or not isinstance(actors, int) or actors < 1:
        raise ConfigError(f"--actors {actors!r}; expected an int >= 1")
    started = start_ray(ray, address, actors)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        items = [{"part": p.to_json()} for p in parts]
        screened = ray.data.from_items(items, override_num_blocks=max(len(items), 1)).map_batches(
            PartScreener, fn_constructor_kwargs={"spec": spec, "folder": folder, "threads": threads},
            batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1)
        done: list[PartDone] = []
        try:
            for batch in screened.iter_batches(batch_size=None, batch_format="numpy"):
                for i in range(len(batch["name"])):
                    item = PartDone(**{f.name: _plain(batch[f.name][i]) for f in fields(PartDone)})
                    done.append(item)
                    advance(item.rows)
        except Exception as exc:  # Ray wraps what an actor raised; a malex error is still one line
            cause = _malex_cause(exc)
            if cause is not None:
                raise cause from exc
            raise
        return done
    finally:
        if started:
            ray.shutdown()
