"""The scan on Ray: the parts as a Ray Data dataset, screened by a pool of actors that each load the model and the
guard once (`map_batches` with a callable class) and write each part's file themselves. Ray restarts a killed
actor and retries its part; the part's file name is fixed, so a retried part is written once, not twice. Ray is
imported (`malex.cluster`) only when a scan asks for it."""

from __future__ import annotations

from dataclasses import fields
from typing import Callable

import numpy as np

from malex.cluster import check_workers, import_ray, malex_cause, start_ray
from malex.guard.spec import GuardSpec
from malex.scan.folder import ScanFolder
from malex.scan.parts import Part
from malex.scan.screen import PartDone, process_part


class PartScreener:
    """A Ray actor's work: load the guard once, then screen each part it is handed and write its file."""

    def __init__(self, spec: GuardSpec, folder: ScanFolder, threads: int = 1, resize: bool = False) -> None:
        import torch

        torch.set_num_threads(threads)
        self.guard = spec.load()
        self.folder = folder
        self.resize = resize

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        done = [process_part(self.guard, Part.from_json(str(text)), self.folder, self.resize) for text in batch["part"]]
        return {f.name: np.array([getattr(d, f.name) for d in done]) for f in fields(PartDone)}


def _plain(value):
    """A NumPy scalar as the Python value (strings come back as Python strings already)."""
    return value.item() if isinstance(value, np.generic) else value


def run_on_ray(spec: GuardSpec, parts: list[Part], folder: ScanFolder, address: str, actors: int,
               advance: Callable[[int], None], threads: int = 1, resize: bool = False) -> list[PartDone]:
    """Screen `parts` with `actors` Ray actors (one CPU each, `threads` torch threads); `advance(n)` as parts
    finish. Returns what each part gave."""
    ray = import_ray()
    check_workers(actors, "--actors")
    started = start_ray(ray, address, actors)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        items = [{"part": p.to_json()} for p in parts]
        screened = ray.data.from_items(items, override_num_blocks=max(len(items), 1)).map_batches(
            PartScreener, fn_constructor_kwargs={"spec": spec, "folder": folder, "threads": threads, "resize": resize},
            batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1)
        done: list[PartDone] = []
        try:
            for batch in screened.iter_batches(batch_size=None, batch_format="numpy"):
                for i in range(len(batch["name"])):
                    item = PartDone(**{f.name: _plain(batch[f.name][i]) for f in fields(PartDone)})
                    done.append(item)
                    advance(item.rows)
        except Exception as exc:  # Ray wraps what an actor raised; a malex error is still one line
            cause = malex_cause(exc)
            if cause is not None:
                raise cause from exc
            raise
        return done
    finally:
        if started:
            ray.shutdown()
