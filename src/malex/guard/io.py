"""Guard files: one safetensors file, tensors plus a JSON header, verified on load; no pickle anywhere.

The header records the guarded model's fingerprint (a guard loaded in front of another model is
refused) and a SHA-256 digest over the header and every tensor (an edited or truncated file is refused).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from malex.atomic import write_safetensors
from malex.calibration import Threshold
from malex.errors import ConfigError, ModelFileError
from malex.guard.fingerprint import hash_tensors, model_fingerprint

if TYPE_CHECKING:
    from malex.guard.guard import Guard

FORMAT = "malex-guard"
FORMAT_VERSION = 1


def _digest(header: dict, tensors: dict[str, torch.Tensor]) -> str:
    return hash_tensors(hashlib.sha256(json.dumps(header, sort_keys=True).encode()), tensors).hexdigest()


def save_guard(guard: "Guard", path: str | Path, overwrite: bool = False) -> Path:
    """Write a fitted guard; refuses to replace an existing file unless `overwrite`."""
    guard._check_fitted()
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --force) to replace it")
    tensors: dict[str, torch.Tensor] = {}
    detectors = {}
    for name, det in guard.detectors.items():
        meta, det_tensors = det.export()
        detectors[name] = meta
        tensors.update({f"det/{name}/{k}": v for k, v in det_tensors.items()})
        tensors[f"cal/{name}"] = torch.from_numpy(np.asarray(guard.calibration_scores_[name], dtype=np.float64))
    config = asdict(guard.config)
    config.pop("progress")
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model_fingerprint": model_fingerprint(guard.model),
        "config": config,
        "threshold": asdict(guard.threshold_),
        "detectors": detectors,
    }
    meta = {"malex": json.dumps(header), "digest": _digest(header, tensors)}
    return write_safetensors(path, tensors, meta)


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    if not path.is_file():
        raise ModelFileError(f"{path}: no such guard file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: not a readable guard file ({exc}); it may be truncated or not a guard") from exc
    if "malex" not in meta or "digest" not in meta:
        raise ModelFileError(f"{path}: a safetensors file without a malex guard header; expected a malex guard file")
    try:
        header = json.loads(meta["malex"])
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: the guard header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a malex guard file (format {header.get('format') if isinstance(header, dict) else None!r})")
    if header.get("version") != FORMAT_VERSION:
        raise ModelFileError(f"{path}: guard format version {header.get('version')}; this malex reads {FORMAT_VERSION}")
    if _digest(header, tensors) != meta["digest"]:
        raise ModelFileError(f"{path}: the guard file's contents do not match its digest; it was modified or damaged")
    return header, tensors


def load_guard(path: str | Path, model: nn.Module) -> "Guard":
    """Load a guard file in front of `model`; refused when `model` is not the one it was fitted for."""
    from malex.guard.guard import Guard, GuardConfig

    path = Path(path)
    header, tensors = _read(path)
    if header["model_fingerprint"] != model_fingerprint(model):
        raise ModelFileError(f"{path}: this guard was fitted for a different model (weights fingerprint differs)")
    try:
        cfg = header["config"]
        config = GuardConfig(**{**cfg, "detectors": tuple(cfg["detectors"]), "progress": False})
        guard = Guard(model, config)
        for name, det in guard.detectors.items():
            prefix = f"det/{name}/"
            det.restore(header["detectors"][name], {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        guard.calibration_scores_ = {name: tensors[f"cal/{name}"].numpy() for name in guard.detectors}
        guard.threshold_ = Threshold(**header["threshold"])
    except (KeyError, TypeError, ConfigError) as exc:
        raise ModelFileError(f"{path}: the guard header is incomplete or malformed ({exc})") from exc
    return guard
