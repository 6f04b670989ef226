"""The study's guard: fitted once per model on both clean validation halves, its screening of the clean test
inputs cached beside it, and its screening of each cell's malicious inputs cached in the cell.

A screening holds the guard score, the flag and the verdict of each input (`VERDICTS` index). Screenings cached
before verdicts were recorded are screened again by the cached guard file (nothing is refitted)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from malex.errors import MalexError
from malex.evaluate.study.cache import Artifact
from malex.evaluate.study.context import StudyContext
from malex.evaluate.study.fits import seeded_settings
from malex.evaluate.study.grid import Cell
from malex.evaluate.study.pools import Pools
from malex.evaluate.study.specs import Specs
from malex.guard import Guard, GuardConfig
from malex.guard.verdict import VERDICTS

#: the tensors a cached screening holds
SCREENING = ("guard_score", "flagged", "verdict")


@dataclass
class GuardFit:
    """A fitted guard's id and its screening of the clean test inputs; the guard itself once loaded or fitted."""

    id: str
    clean_score: np.ndarray
    clean_flagged: np.ndarray
    clean_verdict: np.ndarray  # index into VERDICTS per clean test input
    guard: Guard | None = None


def guard_config(specs: Specs) -> GuardConfig:
    """The dataset's guard detectors with their settings, seeded by the study's seed, at the study's FPR, deciding
    as the config says (combination rule, typing)."""
    ds, seed = specs.ds, specs.seed
    settings = {d: seeded_settings(d, ds.detector_settings.get(d, {}), seed) for d in ds.guard}
    decision = ds.guard_decision
    return GuardConfig(detectors=tuple(ds.guard), settings={d: v for d, v in settings.items() if v},
                       fpr=specs.config.fpr, seed=seed, progress=False, combination=decision.combination,
                       typing=decision.typing, typing_settings=dict(decision.typing_settings))


def _screening(screened) -> dict[str, torch.Tensor]:
    return {"guard_score": torch.from_numpy(np.asarray(screened.guard_score, np.float64)),
            "flagged": torch.from_numpy(np.asarray(screened.flagged, bool).astype(np.uint8)),
            "verdict": torch.tensor([VERDICTS.index(v) for v in screened.verdict], dtype=torch.uint8)}


def _read_screening(got: tuple[dict, dict[str, torch.Tensor]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(guard scores, flags, verdict indices)."""
    t = got[1]
    return t["guard_score"].numpy(), t["flagged"].numpy().astype(bool), t["verdict"].numpy().astype(np.int64)


def _load(ctx: StudyContext, specs: Specs, key: str, model: nn.Module) -> Guard | None:
    """The cached guard file of `key`'s model, or None when it no longer loads."""
    try:
        return Guard.load(ctx.layout.guard(specs.ds.name, specs.seed, key), model)
    except (MalexError, OSError):
        return None


def load_or_fit_guard(ctx: StudyContext, specs: Specs, key: str, model: nn.Module, model_id: str, pools: Pools,
                      clean: torch.Tensor) -> GuardFit:
    """`key`'s guard: its cached screening of the clean test inputs (the guard itself is loaded when needed), or
    fitted now."""
    ds = specs.ds
    artifact = Artifact(ctx.layout.guard_clean(ds.name, specs.seed, key), specs.guard(model_id))
    got = artifact.read(*SCREENING)
    if got is not None and ctx.layout.guard(ds.name, specs.seed, key).is_file():
        return GuardFit(got[0]["id"], *_read_screening(got))
    if artifact.read("guard_score", "flagged") is not None:  # cached before verdicts were: screen again
        guard = _load(ctx, specs, key, model)
        if guard is not None:
            screened = _screening(guard.screen(clean))
            meta = artifact.write(screened)
            ctx.counts["guard_screenings"] += 1
            return GuardFit(meta["id"], *_read_screening(({}, screened)), guard)
    return fit_guard(ctx, specs, key, model, model_id, pools, clean)


def fit_guard(ctx: StudyContext, specs: Specs, key: str, model: nn.Module, model_id: str, pools: Pools,
              clean: torch.Tensor) -> GuardFit:
    """Fit the guard on the fit and calibration splits together (it keeps its own calibration part), screen the
    clean test inputs, and cache the guard file and the screening."""
    ds = specs.ds
    x = torch.cat([pools.fit.x, pools.calibration.x])
    y = torch.cat([pools.fit.y, pools.calibration.y])
    groups = None if pools.fit.groups is None else torch.cat([pools.fit.groups, pools.calibration.groups])
    ctx.log(f"  fitting the guard ({', '.join(ds.guard)}) on {len(x)} clean inputs ({key} model)")
    guard = Guard(model, guard_config(specs)).fit(x, y, groups)
    screened = _screening(guard.screen(clean))
    guard.save(ctx.layout.guard(ds.name, specs.seed, key), overwrite=True)
    meta = Artifact(ctx.layout.guard_clean(ds.name, specs.seed, key), specs.guard(model_id)).write(screened)
    ctx.counts["guards_fitted"] += 1
    return GuardFit(meta["id"], *_read_screening(({}, screened)), guard)


def with_guard(ctx: StudyContext, specs: Specs, key: str, model: nn.Module, fit: GuardFit,
               refit: Callable[[], GuardFit]) -> GuardFit:
    """`fit` with its guard loaded from the cached file (or, when that no longer loads, refitted by `refit`)."""
    if fit.guard is None:
        fit.guard = _load(ctx, specs, key, model)
        if fit.guard is None:
            fit = refit()
    return fit


def screen_cell(ctx: StudyContext, specs: Specs, cell: Cell, key: str, x: torch.Tensor, attack_id: str,
                fit: GuardFit, model: nn.Module, refit: Callable[[], GuardFit]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The guard's score, flag and verdict on the cell's malicious inputs: cached, or screened now (a guard file
    that no longer loads is refitted through `refit`)."""
    path = ctx.layout.cell_guard(cell.dataset, cell.attack, cell.seed)
    got = Artifact(path, specs.screening(attack_id, fit.id)).read(*SCREENING)
    if got is not None:
        return _read_screening(got)
    if len(x):
        fit = with_guard(ctx, specs, key, model, fit, refit)
    screened = _screening(fit.guard.screen(x)) if len(x) else {
        "guard_score": torch.zeros(0, dtype=torch.float64), "flagged": torch.zeros(0, dtype=torch.uint8),
        "verdict": torch.zeros(0, dtype=torch.uint8)}
    Artifact(path, specs.screening(attack_id, fit.id)).write(screened)
    ctx.counts["guard_screenings"] += 1
    return _read_screening(({}, screened))

