"""What each artifact of one (dataset, seed) is made from: its spec, recorded in the artifact's header.

A spec holds every setting that determines the artifact and the ids of the artifacts it was made from, so a
changed setting or a remade input invalidates exactly what depends on it (see cache.py). The dictionaries
below are the on-disk record: changing one makes every study folder redo that artifact.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from malex.evaluate.study.config import AttackSpec, DatasetSpec, StudyConfig


@dataclass(frozen=True)
class Specs:
    """The specs of one (dataset, seed). `grouped`: the validation split comes in groups of near-copies
    (GTSRB's tracks), kept whole on one side of every split."""

    config: StudyConfig
    ds: DatasetSpec
    seed: int
    grouped: bool

    def data(self) -> dict[str, Any]:
        ds = self.ds
        spec = {"data": ds.data, "data_dir": self.config.data_dir, "seed": self.seed, "n_fit": ds.n_fit,
                "n_calibration": ds.n_calibration, "n_clean": ds.n_clean}
        if self.grouped:
            spec["validation_split"] = "whole groups, stratified by the class of their first input"
        return spec

    def model(self, key: str, base_id: str | None = None) -> dict[str, Any]:
        """`base_id`: a fine-tuned backdoor's clean model, the one it was fine-tuned from."""
        ds = self.ds
        backdoor = ds.backdoor_of(key)
        spec = {"data": ds.data, "data_dir": self.config.data_dir, "seed": self.seed, **ds.network.describe(),
                "train": ds.train,
                "backdoor": None if backdoor is None else {**backdoor.describe(), "rate": ds.rate_of(backdoor),
                                                           "target": ds.target}}
        if ds.fine_tuned(key):
            spec["fine_tuned_from"] = base_id
        return spec

    def attack(self, attack: AttackSpec, model_id: str) -> dict[str, Any]:
        ds = self.ds
        return {"model": model_id, "attack": attack.describe(), "n_malicious": ds.n_malicious,
                "target": ds.target, "sources": {"data": ds.data, "data_dir": self.config.data_dir, "seed": self.seed}}

    def fit(self, detector: str, model_id: str) -> dict[str, Any]:
        return {"model": model_id, "detector": detector, "settings": self.ds.detector_settings.get(detector, {}),
                "split": self.data()}

    def guard(self, model_id: str) -> dict[str, Any]:
        ds = self.ds
        spec = {"model": model_id, "detectors": list(ds.guard), "fpr": self.config.fpr, "seeded": True,
                "settings": {d: ds.detector_settings.get(d, {}) for d in ds.guard}, "split": self.data(),
                **ds.guard_decision.describe()}
        if self.grouped:
            spec["groups_kept_whole"] = True  # the guard's own fit / calibration split keeps groups whole
        return spec

    def cell(self, attack_id: str, fits: dict[str, str], guard_id: str) -> dict[str, Any]:
        return {"attack": attack_id, "fits": fits, "guard": guard_id, "fpr": self.config.fpr}

    def scores(self, attack_id: str, fit_id: str) -> dict[str, Any]:
        """A detector's scores of a cell's malicious inputs."""
        return {"attack": attack_id, "fit": fit_id}

    def screening(self, attack_id: str, guard_id: str) -> dict[str, Any]:
        """The guard's screening of a cell's malicious inputs."""
        return {"attack": attack_id, "guard": guard_id}

    def adaptive(self, model_id: str, guard_id: str, n_sources: int, attack: dict[str, Any], aim: str | None,
                 screened: list[str]) -> dict[str, Any]:
        """One run of an adaptive attack (or of plain PGD) at one budget: the attack (method and settings, eps
        included), what it was aimed at (None: nothing, as plain PGD and feature matching) and the targets that
        screened its examples."""
        return {"model": model_id, "guard": guard_id, "attack": attack, "aim": aim, "screened": screened,
                "n_sources": n_sources, "sources": {"data": self.ds.data, "data_dir": self.config.data_dir,
                                                    "seed": self.seed}}

    def analysis(self, model_id: str, attack_ids: dict[str, str]) -> dict[str, Any]:
        settings = dataclasses.asdict(self.config.analysis)
        settings.pop("enabled")
        return {"model": model_id, "attacks": attack_ids, "analysis": settings, "split": self.data()}
