"""The study's three-space analysis of one model (analysis.py computes it): cached per model at the analysis
seed, made once the model and all its attacks are."""

from __future__ import annotations

from typing import Any

from malex.evaluate.study.analysis import BENIGN, SpaceData, analyse_model
from malex.evaluate.study.cache import Artifact
from malex.evaluate.study.seed import SeedRun


def analysis_spec(run: SeedRun, key: str) -> dict[str, Any] | None:
    """The analysis spec of `key`'s model, from its cached model and attacks; None while one is not made."""
    model = run.recorded_model(key)
    if model is None:
        return None
    attack_ids = {}
    for a in run.ds.attacks_on(key):
        got = Artifact(run.ctx.layout.attack(run.ds.name, run.seed, a.name), run.specs.attack(a, model["id"])).meta()
        if got is None:
            return None
        attack_ids[a.name] = got["id"]
    return run.specs.analysis(model["id"], attack_ids)


def recorded_analysis(run: SeedRun, key: str) -> SpaceData | None:
    """The cached three-space data of `key`'s model (None when not computed or out of date)."""
    spec = analysis_spec(run, key)
    if spec is None:
        return None
    got = Artifact(run.ctx.layout.analysis(run.ds.name, run.seed, key), spec).read()
    if got is None:
        return None
    try:
        return SpaceData.from_tensors(got[0]["data"], got[1])
    except (KeyError, TypeError):
        return None


def make_analysis(run: SeedRun, key: str) -> SpaceData:
    """Compute and cache the three-space data of `key`'s model on its clean test inputs and every attack on it
    (training the model and crafting the attacks first when they are not cached)."""
    ctx, ds, a = run.ctx, run.ds, run.ctx.config.analysis
    model = run.model(key)[0]
    inputs = {BENIGN: run.clean_test(key)}
    for attack in ds.attacks_on(key):
        inputs[f"{attack.kind}: {attack.name}"] = run.attack(attack)[0]
    data = analyse_model(model, run.pools.fit, inputs, a.strengths, a.mutants, a.embedding, a.layers, a.n,
                         run.seed, ctx.config.batch_size)
    header, tensors = data.to_tensors()
    Artifact(ctx.layout.analysis(ds.name, run.seed, key), analysis_spec(run, key)).write(tensors, data=header)
    ctx.counts["analyses"] += 1
    return data
