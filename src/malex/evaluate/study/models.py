"""The study's models: one clean model per (dataset, seed) and one per backdoor, trained once and cached."""

from __future__ import annotations

from typing import Any

from torch import nn

from malex.attacks.backdoor import PoisonConfig, fine_tune_model, make_trigger, train_model
from malex.errors import ModelFileError
from malex.evaluate.study.cache import matches, new_id, normalise
from malex.evaluate.study.context import StudyContext
from malex.evaluate.study.pools import Pools
from malex.evaluate.study.specs import Specs
from malex.models.train import TrainConfig


def recorded_model(ctx: StudyContext, specs: Specs, key: str, base_id: str | None = None) -> dict[str, Any] | None:
    """The study record of `key`'s cached model when it was made from today's spec (no weights read);
    `base_id`: the clean model a fine-tuned backdoor's model must have been fine-tuned from."""
    try:
        meta = specs.ds.network.record(ctx.layout.model(specs.ds.name, specs.seed, key)).get("study")
    except (ModelFileError, AttributeError):
        return None
    return meta if matches(meta, specs.model(key, base_id)) else None


def load_or_train(ctx: StudyContext, specs: Specs, pools: Pools, key: str,
                  base: tuple[nn.Module, dict[str, Any]] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """`key`'s model and its study record: read from the cache, or trained (poisoned for a backdoor) and cached.
    `base`: the clean model and its record, which a fine-tuned backdoor's model is trained further from."""
    ds, seed = specs.ds, specs.seed
    path = ctx.layout.model(ds.name, seed, key)
    base_id = None if base is None else base[1]["id"]
    meta = recorded_model(ctx, specs, key, base_id)
    if meta is not None:
        try:
            return ds.network.load(path, ctx.device), meta
        except ModelFileError:
            pass
    backdoor = ds.backdoor_of(key)
    what = "the clean model" if backdoor is None else f"the model poisoned with {backdoor.name}"
    trigger = None if backdoor is None else make_trigger(backdoor.method, **backdoor.settings)
    poison = None if backdoor is None else PoisonConfig(ds.rate_of(backdoor), ds.target, seed)
    if ds.fine_tuned(key):
        tune = TrainConfig(**{**ds.train, **backdoor.fine_tune}, seed=seed)
        ctx.log(f"  fine-tuning the clean model on data poisoned with {backdoor.name} ({tune.epochs} epochs)")
        trained = fine_tune_model(base[0], ds.arch, pools.data, tune, trigger, poison, progress=ctx.progress)
    else:
        ctx.log(f"  training {what} ({ds.arch}, {ds.train.get('epochs', TrainConfig.epochs)} epochs)")
        trained = train_model(pools.data, ds.network.build, TrainConfig(**ds.train, seed=seed), trigger, poison,
                              device=ctx.device, progress=ctx.progress)
    info = {"clean_accuracy": trained.clean_accuracy}
    if trigger is not None:
        info["attack_success_rate"] = trained.attack_success_rate
    meta = {"spec": normalise(specs.model(key, base_id)), "id": new_id(), **info, "seconds": trained.seconds}
    ds.network.save(trained.model, path, {"dataset": pools.data.name, "study": meta}, overwrite=True)
    ctx.counts["models_trained"] += 1
    facts = ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in info.items())
    ctx.log(f"  {what}: {facts} ({meta['seconds']:.0f} s)")
    return trained.model, meta
