"""Save and load models as safetensors weights with a JSON description in the file's header.

Loading never unpickles anything: the header names a registered architecture, which is rebuilt, and
the weights are read as plain tensors. A corrupt, truncated or foreign file raises `ModelFileError`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from malex.atomic import write_safetensors
from malex.errors import ConfigError, ModelFileError
from malex.models.classifier import Classifier
from malex.models.registry import ARCHITECTURES, build_model

FORMAT = "malex-model"
FORMAT_VERSION = 1


def save_model(model: Classifier, path: str | Path, arch: str, info: dict[str, Any] | None = None,
               overwrite: bool = False) -> Path:
    """Write `model` (built by `build_model(arch, ...)`) to `path`; refuse to replace a file unless asked."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --force) to replace it")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")
    description = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "arch": arch,
        "input_shape": list(model.input_shape),
        "num_classes": model.num_classes,
        "info": info or {},
    }
    return write_safetensors(path, model.state_dict(), {"malex": json.dumps(description)})


def read_description(path: str | Path) -> dict[str, Any]:
    """The JSON description stored in a malex model file's header (no tensors are read)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: not a readable safetensors file ({exc}); expected a malex model file") from exc
    if "malex" not in meta:
        raise ModelFileError(f"{path}: a safetensors file without a malex description; expected a malex model file")
    try:
        desc = json.loads(meta["malex"])
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: the malex description is not valid JSON ({exc})") from exc
    if not isinstance(desc, dict) or desc.get("format") != FORMAT:
        raise ModelFileError(f"{path}: header format is {desc.get('format') if isinstance(desc, dict) else desc!r}; "
                             f"expected {FORMAT!r}")
    if desc.get("version") != FORMAT_VERSION:
        raise ModelFileError(f"{path}: model format version {desc.get('version')}; this malex reads {FORMAT_VERSION}")
    return desc


def check_weights(expected: dict[str, torch.Tensor], tensors: dict[str, Any], where: str, what: str) -> None:
    """`ModelFileError` (naming the file `where` and the model `what`) unless `tensors` holds a finite tensor of
    the expected shape under every key of `expected`, and nothing else."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ModelFileError(f"{where}: weights do not match {what} (missing {missing[:3]}, unexpected {extra[:3]})")
    for key, value in expected.items():
        if tuple(tensors[key].shape) != tuple(value.shape):
            raise ModelFileError(f"{where}: weight {key} has shape {tuple(tensors[key].shape)}; "
                                 f"expected {tuple(value.shape)}")
        if tensors[key].is_floating_point() and not torch.isfinite(tensors[key]).all():
            raise ModelFileError(f"{where}: weight {key} contains NaN or infinite values")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Classifier, dict[str, Any]]:
    """Load a model saved by `save_model`; returns the model in eval mode and its description."""
    path = Path(path)
    desc = read_description(path)
    try:
        model = build_model(desc["arch"], tuple(desc["input_shape"]), int(desc["num_classes"]))
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise ModelFileError(f"{path}: the description does not name a buildable model ({exc})") from exc
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: weights are unreadable ({exc}); the file may be truncated") from exc
    check_weights(model.state_dict(), tensors, str(path), f"architecture {desc['arch']!r}")
    model.load_state_dict(tensors)
    return model.to(device).eval(), desc
