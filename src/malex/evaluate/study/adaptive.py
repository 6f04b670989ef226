"""The study's adaptive attacks: per (dataset, seed), each adaptive attack on the clean model, aimed at the guard
fitted in that cell and at each member alone, at every budget, beside plain PGD at the same budget.

The sources are the first `n_sources` attack sources the clean model classifies correctly. Each run is one cached
artifact (adaptive/DATASET/ATTACK/seedS/RUN.safetensors; its spec holds the model's and the guard's ids, the
attack's settings at that budget and what it was aimed at), holding per source whether the model was fooled,
whether each target flagged the example, and its Linf perturbation:

* plain PGD (`malex.guard.adaptive.plain_pgd`) at each budget, screened by every target;
* an evidence-aware attack (adaptive_pgd, orthogonal_pgd) at each budget and target, screened by its target and
  by the whole guard (how an attack aimed at one member fares against the guard);
* feature matching (aimed at nothing: guided by the guard's clean fit inputs) at each budget, screened by every
  target.

"Attacker success" at a target: fooled AND not flagged by it. `adaptive_rows` gives one row per (budget,
target) of one seed; a rerun reads every run from the cache.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numpy as np
import torch

from malex.attacks.adversarial import ADVERSARIAL_ATTACKS, make_adversarial
from malex.evaluate.study.adaptive_config import AdaptiveSpec
from malex.evaluate.study.attacks import with_seed
from malex.evaluate.study.cache import Artifact
from malex.evaluate.study.config import CLEAN_MODEL
from malex.evaluate.study.seed import SeedRun
from malex.guard.adaptive import GUARD_TARGET, aim, aims_at_target, plain_pgd, targets
from malex.guard.surrogate import SurrogateConfig
from malex.models.inference import predict

PLAIN = "plain_pgd"
FLAGGED = "flagged/"


@dataclasses.dataclass(frozen=True)
class Planned:
    """One cached run: its file name, the attack's method and settings, what it is aimed at, what screens it."""

    file: str
    method: str
    settings: dict[str, Any]
    aim: str | None
    screened: tuple[str, ...]

    def describe(self) -> dict[str, Any]:
        out = {"method": self.method, "settings": self.settings}
        if self.aim is not None and self.method != PLAIN:
            out["surrogate"] = dataclasses.asdict(SurrogateConfig())
        return out


def _label(eps: float) -> str:
    return f"eps{eps:.6g}"


def plan(run: SeedRun, spec: AdaptiveSpec) -> dict[float, dict[str, Planned]]:
    """Per budget: the plain-PGD run ("plain") and the adaptive run for each target (one shared run, keyed by
    every target, when the attack is aimed at nothing)."""
    chosen = spec.targets_of(run.ds.guard)
    settings = with_seed(ADVERSARIAL_ATTACKS[spec.method].config_class, spec.settings, run.seed)
    aimed = aims_at_target(make_adversarial(spec.method, **spec.settings))
    out: dict[float, dict[str, Planned]] = {}
    for eps in spec.budgets:
        pgd = plain_pgd(eps, run.seed)
        runs = {"plain": Planned(f"{PLAIN}-{_label(eps)}", PLAIN, dataclasses.asdict(pgd.config), None, chosen)}
        at_eps = {**settings, "eps": eps}
        if aimed:
            for t in chosen:
                screened = (t,) if t == GUARD_TARGET else (t, GUARD_TARGET)
                runs[t] = Planned(f"{t}-{_label(eps)}", spec.method, at_eps, t, screened)
        else:
            shared = Planned(f"any-{_label(eps)}", spec.method, at_eps, None, chosen)
            runs.update({t: shared for t in chosen})
        out[eps] = runs
    return out


def _sources(run: SeedRun, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n` attack sources the clean model classifies correctly."""
    pool = run.pools.sources
    model = run.model(CLEAN_MODEL)[0]
    right = predict(model, pool.x) == pool.y
    return pool.x[right][:n], pool.y[right][:n]


def _make(run: SeedRun, spec: AdaptiveSpec, planned: Planned, artifact: Artifact,
          sources: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run one planned attack on the `sources` (`_sources`), screen its examples by its targets and cache the
    outcome."""
    ctx = run.ctx
    model = run.model(CLEAN_MODEL)[0]
    guard = run.loaded_guard(CLEAN_MODEL).guard
    x, y = sources
    screens = targets(guard, list(dict.fromkeys(planned.screened + ((planned.aim,) if planned.aim else ()))))
    if planned.method == PLAIN:
        attack = plain_pgd(planned.settings["eps"], planned.settings["seed"])
    else:
        guides = (run.pools.fit.x, run.pools.fit.y)
        attack = make_adversarial(planned.method, **planned.settings)
        attack = aim(attack, screens[planned.aim] if planned.aim else guard, guides)
    t0 = time.perf_counter()
    if len(x):
        result = attack.run(model, x, y, batch_size=ctx.config.batch_size, progress=False)
        tensors = {"fooled": result.success.to(torch.uint8), "linf": result.linf.to(torch.float32)}
        for t in planned.screened:
            flagged = np.asarray(screens[t].screen(result.x_adv).flagged, bool)
            tensors[FLAGGED + t] = torch.from_numpy(flagged.astype(np.uint8))
    else:
        tensors = {"fooled": torch.zeros(0, dtype=torch.uint8), "linf": torch.zeros(0),
                   **{FLAGGED + t: torch.zeros(0, dtype=torch.uint8) for t in planned.screened}}
    seconds = time.perf_counter() - t0
    artifact.write(tensors, seconds=seconds)
    ctx.counts["adaptive_runs"] += 1
    aimed = f" aimed at {planned.aim}" if planned.aim else ""
    ctx.log(f"  {spec.name if planned.method != PLAIN else PLAIN}{aimed}, eps {planned.settings['eps']:g}: "
            f"{len(x)} sources, {seconds:.1f} s")
    return tensors


def adaptive_rows(run: SeedRun, spec: AdaptiveSpec, make: bool = True) -> list[dict[str, Any]] | None:
    """One row per (budget, target) of the adaptive attack `spec` at this (dataset, seed): attacker success, fooled
    and flagged shares of the adaptive attack and of plain PGD (and, aimed at a member, the share that also passes
    the whole guard). Cached runs are read; the others are made when `make`, else the answer is None."""
    ctx, ds, specs = run.ctx, run.ds, run.specs
    if make:
        model_id, guard_id = run.model(CLEAN_MODEL)[1]["id"], run.guard(CLEAN_MODEL).id
    else:
        model = run.recorded_model(CLEAN_MODEL)
        guard = None if model is None else Artifact(ctx.layout.guard_clean(ds.name, run.seed, CLEAN_MODEL),
                                                    specs.guard(model["id"])).meta()
        if guard is None:
            return None
        model_id, guard_id = model["id"], guard["id"]
    outcomes: dict[str, dict[str, torch.Tensor]] = {}
    sources: tuple[torch.Tensor, torch.Tensor] | None = None  # chosen once, when a run must be made
    rows = []
    for scale, (eps, runs) in zip(spec.budget_scale, plan(run, spec).items()):
        for planned in runs.values():
            if planned.file in outcomes:
                continue
            artifact = Artifact(ctx.layout.adaptive(ds.name, spec.name, run.seed, planned.file),
                                specs.adaptive(model_id, guard_id, spec.n_sources, planned.describe(), planned.aim,
                                               list(planned.screened)))
            got = artifact.read("fooled", *(FLAGGED + t for t in planned.screened))
            if got is None and not make:
                return None
            if got is None and sources is None:
                sources = _sources(run, spec.n_sources)
            outcomes[planned.file] = got[1] if got is not None else _make(run, spec, planned, artifact, sources)
        plain = outcomes[runs["plain"].file]
        for target, planned in runs.items():
            if target == "plain":
                continue
            mine = outcomes[planned.file]
            row = {"dataset": ds.name, "attack": spec.name, "method": spec.method, "seed": run.seed,
                   "scale": scale, "eps": eps, "target": target, "n": int(len(mine["fooled"])),
                   **_shares("plain_", plain, target), **_shares("", mine, target),
                   "guard_success": (_shares("", mine, GUARD_TARGET)["success"]
                                     if target != GUARD_TARGET and planned.aim is not None else math.nan)}
            rows.append(row)
    return rows


def _shares(prefix: str, outcome: dict[str, torch.Tensor], target: str) -> dict[str, float]:
    """{prefix}success / fooled / flagged: shares of the sources (NaN without sources)."""
    fooled = outcome["fooled"].numpy().astype(bool)
    flagged = outcome[FLAGGED + target].numpy().astype(bool)
    if not len(fooled):
        return {f"{prefix}success": math.nan, f"{prefix}fooled": math.nan, f"{prefix}flagged": math.nan}
    return {f"{prefix}success": float((fooled & ~flagged).mean()), f"{prefix}fooled": float(fooled.mean()),
            f"{prefix}flagged": float(flagged.mean())}
