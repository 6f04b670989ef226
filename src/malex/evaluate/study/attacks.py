"""The study's malicious inputs: successful attacks only, crafted once per (dataset, seed, attack) and cached."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
from torch import nn

from malex.attacks.adversarial import ADVERSARIAL_ATTACKS, craft_successful, make_adversarial
from malex.attacks.backdoor import make_trigger, successful_triggered
from malex.data.dataset import Split
from malex.evaluate.study.cache import Artifact
from malex.evaluate.study.config import BACKDOOR, AttackSpec
from malex.evaluate.study.context import StudyContext
from malex.evaluate.study.specs import Specs


def with_seed(config_class: type, settings: dict[str, Any], seed: int) -> dict[str, Any]:
    """`settings` plus `seed` when the config has a seed field the user did not set."""
    names = {f.name for f in dataclasses.fields(config_class)}
    return {**settings, "seed": seed} if "seed" in names and "seed" not in settings else dict(settings)


def load_or_craft(ctx: StudyContext, specs: Specs, attack: AttackSpec, model: nn.Module, model_id: str,
                  sources: Split) -> tuple[torch.Tensor, dict[str, Any]]:
    """(malicious inputs, their header): read from the cache, or crafted from `sources` on `model` and cached.
    A backdoor keeps the non-target sources (a source-specific trigger's source classes only: see
    `Trigger.attack_sources`) with the trigger that the model labels as the target; an
    adversarial attack keeps its successful examples of correctly classified sources (with `targeted`, toward
    each other class). At most n_malicious either way."""
    ds = specs.ds
    artifact = Artifact(ctx.layout.attack(ds.name, specs.seed, attack.name), specs.attack(attack, model_id))
    got = artifact.read("x")
    if got is not None:
        return got[1]["x"], got[0]
    t0 = time.perf_counter()
    if attack.kind == BACKDOOR:
        crafted = successful_triggered(model, sources, make_trigger(attack.method, **attack.settings), ds.target,
                                       limit=ds.n_malicious)
        extra = {"source_index": crafted.source_index}
    else:
        settings = with_seed(ADVERSARIAL_ATTACKS[attack.method].config_class, attack.settings, specs.seed)
        crafted = craft_successful(make_adversarial(attack.method, **settings), model, sources.x, sources.y,
                                   targeted=attack.targeted, limit=ds.n_malicious, batch_size=ctx.config.batch_size,
                                   progress=ctx.progress, label=f"{attack.name} on {ds.name} (chunks)")
        extra = {"source_index": crafted.source_index, "label": crafted.label}
    summary = {**crafted.summary, "seconds": time.perf_counter() - t0}
    meta = artifact.write({"x": crafted.x, **extra}, summary=summary)
    ctx.counts["attacks_crafted"] += 1
    ctx.log(f"  {attack.name}: {len(crafted.x)} malicious inputs kept (success rate {summary['success_rate']:.3f}, "
            f"{summary['seconds']:.0f} s)")
    return crafted.x, meta
