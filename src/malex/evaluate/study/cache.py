"""The study's output folder: where each artifact lives, and writes that never leave half a file.

Every file is written to a hidden temporary name in its folder, flushed to disk and renamed over the
final name, so an interrupted run leaves either the old file, the new one, or a stray temporary that
nothing reads. Tensors are safetensors files with a JSON header; everything else is JSON. Each artifact's
header holds its `spec` (everything that determines it, including the ids of the artifacts it was made
from) and an `id` of its own; an artifact whose spec differs from what the current config asks for, or that
cannot be read (truncated, edited), is made again.

    OUT/
      study.json                            marker: this folder holds a malex study; the latest run's config
      study.toml                            the latest run's config file, as written
      models/DATASET/seedS/MODEL.safetensors          clean.safetensors or BACKDOOR.safetensors (models.io)
      attacks/DATASET/seedS/ATTACK.safetensors        the crafted malicious inputs, successful ones only
      fits/DATASET/seedS/MODEL/DETECTOR.safetensors   fitted detector state + calibration and clean scores
      fits/DATASET/seedS/MODEL/guard.safetensors      the fitted guard (Guard.save) ...
      fits/DATASET/seedS/MODEL/guard-clean.safetensors ... and its screening of the clean test inputs
      cells/DATASET/ATTACK/seedS/scores/DETECTOR.safetensors   scores of the malicious inputs
      cells/DATASET/ATTACK/seedS/guard.safetensors    the guard's screening of the malicious inputs
      cells/DATASET/ATTACK/seedS/metrics.json         the finished cell (written last)
      analysis/DATASET/seedS/MODEL.safetensors        the three-space data drawn in the report
      adaptive/DATASET/ATTACK/seedS/RUN.safetensors   an adaptive attack's (or plain PGD's) outcome at one budget
      results.md, results.csv, summary.csv            the tables (adaptive.csv: the adaptive attacks, per seed)
      report/index.html + PNG plots                   the report (offline, no scripts)
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors

from malex.atomic import atomic_write_bytes, write_safetensors
from malex.errors import ConfigError

FORMAT = "malex-study"
FORMAT_VERSION = 1
META_KEY = "malex-study"


def normalise(obj: Any) -> Any:
    """`obj` as it reads back from JSON (tuples become lists), so that specs compare equal after a reload."""
    return json.loads(json.dumps(obj, sort_keys=True))


def new_id() -> str:
    """A fresh artifact id."""
    return uuid.uuid4().hex[:16]


def digest(obj: Any) -> str:
    """A short SHA-256 of the JSON of `obj`."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def write_json(path: Path, obj: Any) -> Path:
    """Write `obj` as indented JSON, atomically."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object at `path`, or None when it is missing or unreadable (e.g. half-written)."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write named tensors and a JSON header as one safetensors file, atomically."""
    return write_safetensors(path, tensors, {META_KEY: json.dumps(meta)})


def read_tensors(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """(header, tensors) of a file written by `write_tensors`, or None when missing or unreadable."""
    try:
        data = path.read_bytes()
        tensors = load_safetensors(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_len])
        meta = json.loads(header["__metadata__"][META_KEY])
    except (OSError, SafetensorError, ValueError, KeyError, TypeError):
        return None
    return (meta, tensors) if isinstance(meta, dict) else None


def read_meta(path: Path) -> dict[str, Any] | None:
    """The JSON header of a file written by `write_tensors` (tensors not read; a file shorter than its header
    says, e.g. half-written, is refused), or None."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {})[META_KEY])
    except (OSError, SafetensorError, ValueError, KeyError, TypeError):
        return None
    return meta if isinstance(meta, dict) else None


def matches(meta: dict[str, Any] | None, spec: Any) -> bool:
    """Whether a read header was made from `spec`."""
    return meta is not None and "id" in meta and meta.get("spec") == normalise(spec)


@dataclass(frozen=True)
class Artifact:
    """One cached tensor file and the spec it must have been made from: `meta` and `read` give what is on disk
    only when it was made from this spec (and is readable), `write` records the spec and a fresh id."""

    path: Path
    spec: Any

    def meta(self) -> dict[str, Any] | None:
        """The header (tensors not read), or None when the file is missing, unreadable or made otherwise."""
        meta = read_meta(self.path)
        return meta if matches(meta, self.spec) else None

    def read(self, *required: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        """(header, tensors), or None when missing, unreadable, made otherwise or lacking a `required` tensor."""
        got = read_tensors(self.path)
        if got is None or not matches(got[0], self.spec) or not set(required) <= set(got[1]):
            return None
        return got

    def write(self, tensors: dict[str, torch.Tensor], **extra: Any) -> dict[str, Any]:
        """Write `tensors` with a header of the spec, a new id and `extra`; returns the header."""
        meta = {"spec": normalise(self.spec), "id": new_id(), **extra}
        write_tensors(self.path, tensors, meta)
        return meta


class StudyLayout:
    """Paths of everything under one study's output folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # --- the folder itself ---------------------------------------------------------------------------------
    @property
    def marker(self) -> Path:
        return self.root / "study.json"

    @property
    def config_copy(self) -> Path:
        return self.root / "study.toml"

    def is_study(self) -> bool:
        marker = read_json(self.marker)
        return marker is not None and marker.get("format") == FORMAT

    def claim(self, raw_config: dict[str, Any], base_dir: str | None, config_text: str | None = None) -> None:
        """Make the folder a study folder (refusing a non-empty folder that is not one) and record the config:
        the parsed mapping and the folder its relative paths resolve against in study.json, and the TOML
        text as study.toml when there is one."""
        if self.root.exists() and not self.root.is_dir():
            raise FileExistsError(f"{self.root} is a file; expected a folder for the study's outputs")
        if self.root.is_dir() and any(self.root.iterdir()) and not self.is_study():
            raise FileExistsError(f"{self.root} is a non-empty folder that holds no malex study; choose a new or "
                                  "empty folder (nothing in it is overwritten)")
        marker = read_json(self.marker) if self.is_study() else None
        created = (marker or {}).get("created") or datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_json(self.marker, {"format": FORMAT, "version": FORMAT_VERSION, "created": created,
                                 "config": raw_config, "config_dir": base_dir})
        if config_text is not None:
            atomic_write_bytes(self.config_copy, config_text.encode("utf-8"))
        elif self.config_copy.exists():
            self.config_copy.unlink()  # an older run's TOML no longer describes this folder

    def recorded_config(self) -> tuple[dict[str, Any], str | None]:
        """(the config mapping, its base folder) recorded by the latest run."""
        self.require_study()
        marker = read_json(self.marker) or {}
        if not isinstance(marker.get("config"), dict):
            raise ConfigError(f"{self.marker}: records no study config; run `malex study` into this folder again")
        return marker["config"], marker.get("config_dir")

    def require_study(self) -> None:
        if not self.is_study():
            raise ConfigError(f"{self.root} holds no malex study (no study.json); run `malex study` first")

    # --- artifacts -------------------------------------------------------------------------------------------
    def model(self, dataset: str, seed: int, model_key: str) -> Path:
        return self.root / "models" / dataset / f"seed{seed}" / f"{model_key}.safetensors"

    def attack(self, dataset: str, seed: int, attack: str) -> Path:
        return self.root / "attacks" / dataset / f"seed{seed}" / f"{attack}.safetensors"

    def fit(self, dataset: str, seed: int, model_key: str, detector: str) -> Path:
        return self.root / "fits" / dataset / f"seed{seed}" / model_key / f"{detector}.safetensors"

    def guard(self, dataset: str, seed: int, model_key: str) -> Path:
        return self.root / "fits" / dataset / f"seed{seed}" / model_key / "guard.safetensors"

    def guard_clean(self, dataset: str, seed: int, model_key: str) -> Path:
        return self.root / "fits" / dataset / f"seed{seed}" / model_key / "guard-clean.safetensors"

    def cell(self, dataset: str, attack: str, seed: int) -> Path:
        return self.root / "cells" / dataset / attack / f"seed{seed}"

    def cell_metrics(self, dataset: str, attack: str, seed: int) -> Path:
        return self.cell(dataset, attack, seed) / "metrics.json"

    def cell_scores(self, dataset: str, attack: str, seed: int, detector: str) -> Path:
        return self.cell(dataset, attack, seed) / "scores" / f"{detector}.safetensors"

    def cell_guard(self, dataset: str, attack: str, seed: int) -> Path:
        return self.cell(dataset, attack, seed) / "guard.safetensors"

    def adaptive(self, dataset: str, attack: str, seed: int, run: str) -> Path:
        return self.root / "adaptive" / dataset / attack / f"seed{seed}" / f"{run}.safetensors"

    def analysis(self, dataset: str, seed: int, model_key: str) -> Path:
        return self.root / "analysis" / dataset / f"seed{seed}" / f"{model_key}.safetensors"

    # --- tables and report -----------------------------------------------------------------------------------
    @property
    def results_md(self) -> Path:
        return self.root / "results.md"

    @property
    def results_csv(self) -> Path:
        return self.root / "results.csv"

    @property
    def summary_csv(self) -> Path:
        return self.root / "summary.csv"

    @property
    def adaptive_csv(self) -> Path:
        return self.root / "adaptive.csv"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"
