"""The study's detectors: fitted once per model on the clean fit split, with their calibration and clean test
scores cached beside their state; restored only when new malicious inputs need scores."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from malex.detectors import Detector, detector_config_fields, make_detector
from malex.detectors.fitting import fit_detectors, joint_probe, score_detectors
from malex.errors import ConfigError, MalexError
from malex.evaluate.study.cache import Artifact, read_tensors
from malex.evaluate.study.context import StudyContext
from malex.evaluate.study.grid import Cell
from malex.evaluate.study.pools import Pools
from malex.evaluate.study.specs import Specs

STATE = "state/"


@dataclass
class Fit:
    """A fitted detector's cached outputs; the detector itself is restored only when new inputs need scores."""

    id: str
    calibration: np.ndarray
    clean: np.ndarray
    path: Path
    detector: Detector | None = None


def seeded_settings(name: str, settings: dict[str, Any], seed: int) -> dict[str, Any]:
    """A detector's settings plus the study's seed, when its config has a seed the user did not set."""
    if "seed" in settings or "seed" not in detector_config_fields(name):
        return dict(settings)
    return {**settings, "seed": seed}


def build_detector(name: str, model: nn.Module, settings: dict[str, Any], seed: int) -> Detector:
    """`make_detector`, with the study's seed when the detector's config has a seed the user did not set."""
    return make_detector(name, model, **seeded_settings(name, settings, seed))


def load_or_fit(ctx: StudyContext, specs: Specs, key: str, model: nn.Module, model_id: str, pools: Pools,
                clean: torch.Tensor) -> dict[str, Fit]:
    """Every detector of the dataset fitted on `key`'s model: read from the cache, the missing ones fitted now."""
    ds = specs.ds
    fits: dict[str, Fit] = {}
    missing = []
    for det in ds.detectors:
        got = Artifact(ctx.layout.fit(ds.name, specs.seed, key, det), specs.fit(det, model_id)).read(
            "calibration", "clean")
        if got is None:
            missing.append(det)
        else:
            fits[det] = Fit(got[0]["id"], got[1]["calibration"].numpy(), got[1]["clean"].numpy(),
                            ctx.layout.fit(ds.name, specs.seed, key, det))
    if missing:
        fits.update(fit_and_cache(ctx, specs, key, model, model_id, pools, clean, missing))
    return {det: fits[det] for det in ds.detectors}


def fit_and_cache(ctx: StudyContext, specs: Specs, key: str, model: nn.Module, model_id: str, pools: Pools,
                  clean: torch.Tensor, names: list[str]) -> dict[str, Fit]:
    """Fit `names` on the fit split (one probe pass), score the calibration split and the clean test inputs, and
    cache each detector's state and scores. A fit's `seconds` is that of the whole joint fit and scoring."""
    ds, seed, batch = specs.ds, specs.seed, ctx.config.batch_size
    dets = {name: build_detector(name, model, ds.detector_settings.get(name, {}), seed) for name in names}
    probe = joint_probe(model, dets)
    ctx.log(f"  fitting {', '.join(names)} on {len(pools.fit)} clean inputs ({key} model)")
    t0 = time.perf_counter()
    fit_detectors(dets, probe, pools.fit.x, pools.fit.y, batch_size=batch, progress=ctx.progress,
                  label=f"fitting detectors ({key} model)")
    calibration = score_detectors(dets, probe, pools.calibration.x, batch_size=batch)
    clean_scores = score_detectors(dets, probe, clean, batch_size=batch)
    seconds = time.perf_counter() - t0
    out = {}
    for name, det in dets.items():
        try:
            state, tensors = det.export()
        except TypeError as exc:
            raise ConfigError(f"detector {name!r} cannot save its fitted state, which the study caches ({exc})"
                              ) from exc
        artifact = Artifact(ctx.layout.fit(ds.name, seed, key, name), specs.fit(name, model_id))
        meta = artifact.write({"calibration": torch.from_numpy(calibration[name]),
                               "clean": torch.from_numpy(clean_scores[name]),
                               **{f"{STATE}{k}": v for k, v in tensors.items()}}, state=state, seconds=seconds)
        out[name] = Fit(meta["id"], calibration[name], clean_scores[name], artifact.path, det)
        ctx.counts["detectors_fitted"] += 1
    return out


def restore(specs: Specs, name: str, fit: Fit, model: nn.Module) -> Detector | None:
    """The fitted detector rebuilt from its cached state (kept on `fit`), or None when that state is gone or
    unreadable."""
    if fit.detector is not None:
        return fit.detector
    got = read_tensors(fit.path)
    if got is None or got[0].get("id") != fit.id or got[0].get("state") is None:
        return None
    det = build_detector(name, model, specs.ds.detector_settings.get(name, {}), specs.seed)
    try:
        det.restore(got[0]["state"], {k[len(STATE):]: v for k, v in got[1].items() if k.startswith(STATE)})
    except MalexError:
        return None
    fit.detector = det
    return det


def malicious_scores(ctx: StudyContext, specs: Specs, cell: Cell, x: torch.Tensor, attack_id: str,
                     fits: dict[str, Fit], model: nn.Module, refit: Callable[[str], Fit]) -> dict[str, np.ndarray]:
    """Every detector's scores of the cell's malicious inputs: read from the cache, the missing ones scored with
    one probe pass. A detector whose state cannot be restored is refitted (`refit`, which replaces its entry in
    `fits`, so the scores record the new fit's id)."""
    layout = ctx.layout
    scores, missing = {}, []
    for name, fit in fits.items():
        got = Artifact(layout.cell_scores(cell.dataset, cell.attack, cell.seed, name),
                       specs.scores(attack_id, fit.id)).read("scores")
        if got is None:
            missing.append(name)
        else:
            scores[name] = got[1]["scores"].numpy()
    if not missing:
        return scores
    if len(x):
        dets = {name: restore(specs, name, fits[name], model) or refit(name).detector for name in missing}
        computed = score_detectors(dets, joint_probe(model, dets), x, batch_size=ctx.config.batch_size,
                                   progress=ctx.progress, label=f"scoring {cell.attack}")
    else:
        computed = {name: np.zeros(0) for name in missing}
    for name in missing:
        Artifact(layout.cell_scores(cell.dataset, cell.attack, cell.seed, name),
                 specs.scores(attack_id, fits[name].id)).write({"scores": torch.from_numpy(computed[name])})
        scores[name] = computed[name]
        ctx.counts["detector_scores"] += 1
    return scores
