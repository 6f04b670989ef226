"""Everything one (dataset, seed) of the grid makes: its clean splits, models, malicious inputs, fitted detectors
and guards. Each is made at most once per run (read from the cache when it is there) and kept while the run
works on this (dataset, seed); the steps themselves live in models.py, attacks.py, fits.py and guards.py."""

from __future__ import annotations

from functools import cached_property
from typing import Any

import torch
from torch import nn

from malex.evaluate.study import attacks, fits, guards, models
from malex.evaluate.study.config import CLEAN_MODEL, AttackSpec, DatasetSpec
from malex.evaluate.study.context import StudyContext
from malex.evaluate.study.pools import Pools, make_pools
from malex.evaluate.study.specs import Specs
from malex.models.inference import predict


class SeedRun:
    """The memoised artifacts of one (dataset, seed)."""

    def __init__(self, ctx: StudyContext, ds: DatasetSpec, seed: int) -> None:
        self.ctx = ctx
        self.ds = ds
        self.seed = seed
        self._models: dict[str, tuple[nn.Module, dict[str, Any]]] = {}
        self._clean: dict[str, torch.Tensor] = {}
        self._attacks: dict[str, tuple[torch.Tensor, dict[str, Any]]] = {}
        self._fits: dict[str, dict[str, fits.Fit]] = {}
        self._guards: dict[str, guards.GuardFit] = {}

    @cached_property
    def pools(self) -> Pools:
        return make_pools(self.ctx.config, self.ds, self.seed)

    @cached_property
    def specs(self) -> Specs:
        return Specs(self.ctx.config, self.ds, self.seed, self.pools.grouped)

    def recorded_model(self, key: str) -> dict[str, Any] | None:
        """The cached model's study record, when it matches today's spec (nothing is trained or loaded); a
        fine-tuned backdoor's model must also come from today's cached clean model."""
        if not self.ds.fine_tuned(key):
            return models.recorded_model(self.ctx, self.specs, key)
        base = self.recorded_model(CLEAN_MODEL)
        return None if base is None else models.recorded_model(self.ctx, self.specs, key, base["id"])

    def model(self, key: str) -> tuple[nn.Module, dict[str, Any]]:
        """`key`'s model and its record (a fine-tuned backdoor's: from the clean model, made first if needed)."""
        if key not in self._models:
            base = self.model(CLEAN_MODEL) if self.ds.fine_tuned(key) else None
            self._models[key] = models.load_or_train(self.ctx, self.specs, self.pools, key, base)
        return self._models[key]

    def clean_test(self, key: str) -> torch.Tensor:
        """Up to n_clean clean test inputs that `key`'s model classifies correctly."""
        if key not in self._clean:
            pool, model = self.pools.clean, self.model(key)[0]
            self._clean[key] = pool.x[predict(model, pool.x) == pool.y][:self.ds.n_clean]
        return self._clean[key]

    def attack(self, attack: AttackSpec) -> tuple[torch.Tensor, dict[str, Any]]:
        """(the attack's successful malicious inputs, their header)."""
        if attack.name not in self._attacks:
            model, meta = self.model(attack.model_key)
            self._attacks[attack.name] = attacks.load_or_craft(self.ctx, self.specs, attack, model, meta["id"],
                                                               self.pools.sources)
        return self._attacks[attack.name]

    def fits(self, key: str) -> dict[str, fits.Fit]:
        """Every detector of the dataset fitted on `key`'s model."""
        if key not in self._fits:
            model, meta = self.model(key)
            self._fits[key] = fits.load_or_fit(self.ctx, self.specs, key, model, meta["id"], self.pools,
                                               self.clean_test(key))
        return self._fits[key]

    def refit(self, key: str, name: str) -> fits.Fit:
        """Fit detector `name` on `key`'s model again (its cached state was lost) and remember the new fit."""
        model, meta = self.model(key)
        fit = fits.fit_and_cache(self.ctx, self.specs, key, model, meta["id"], self.pools, self.clean_test(key),
                                 [name])[name]
        self.fits(key)[name] = fit
        return fit

    def guard(self, key: str) -> guards.GuardFit:
        if key not in self._guards:
            model, meta = self.model(key)
            self._guards[key] = guards.load_or_fit_guard(self.ctx, self.specs, key, model, meta["id"], self.pools,
                                                         self.clean_test(key))
        return self._guards[key]

    def refit_guard(self, key: str) -> guards.GuardFit:
        """Fit `key`'s guard again (its file no longer loads) and remember it."""
        model, meta = self.model(key)
        self._guards[key] = guards.fit_guard(self.ctx, self.specs, key, model, meta["id"], self.pools,
                                             self.clean_test(key))
        return self._guards[key]

    def loaded_guard(self, key: str) -> guards.GuardFit:
        """`key`'s guard with the fitted guard itself in hand (loaded, or refitted when its file no longer loads)."""
        fit = guards.with_guard(self.ctx, self.specs, key, self.model(key)[0], self.guard(key),
                                lambda: self.refit_guard(key))
        self._guards[key] = fit
        return fit
