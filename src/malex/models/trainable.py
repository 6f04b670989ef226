"""An architecture a study trains: one of malex's by name, or a network of one's own (`module:callable`).

A registered name is built, saved and loaded as a malex model file (`malex.models.io`). A factory
(`"my_pkg.nets:resnet18"`, called with `arch_kwargs`) is built behind its declared `Preprocessing`, so it takes
[0, 1] inputs like every model malex handles, and its trained weights are written as the bare network's
state_dict in safetensors, the study's record under the header key `RECORD_KEY`. Such a file is what
`malex fit FILE --arch module:callable --mean ... --std ...` reads: the factory comes from the config or the
command line, never from the file, so loading it runs no code the file names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from malex.atomic import check_output, write_safetensors
from malex.errors import ConfigError, ModelFileError
from malex.models.io import load_model, read_description, save_model
from malex.models.preprocess import Preprocessed, Preprocessing, with_preprocessing
from malex.models.registry import ARCHITECTURES, build_model
from malex.models.sources import ModelSpec, build_foreign, declare_input_shape, load

#: the safetensors header key of a factory-built model's record (a malex model file keeps it in "info")
RECORD_KEY = "malex-record"


@dataclass(frozen=True)
class Trainable:
    """`arch`: a registered architecture's name, or `module:callable` built with `arch_kwargs` and fed inputs
    through `preprocessing` (a registered architecture normalises inside itself and takes neither)."""

    arch: str
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    preprocessing: Preprocessing = Preprocessing()

    def __post_init__(self) -> None:
        if not isinstance(self.arch, str) or not self.arch:
            raise ConfigError(f"arch is {self.arch!r}; expected a registered architecture or module:callable")
        if not self.foreign:
            if self.arch not in ARCHITECTURES:
                raise ConfigError(f"unknown architecture {self.arch!r}; expected one of {', '.join(ARCHITECTURES)} "
                                  "or module:callable")
            if self.arch_kwargs or not self.preprocessing.identity:
                raise ConfigError(f"arch_kwargs and preprocessing are for module:callable networks; "
                                  f"{self.arch!r} is malex's own and takes neither")
        ModelSpec(Path("."), self.arch if self.foreign else None, self.arch_kwargs)  # checks the factory's syntax

    @property
    def foreign(self) -> bool:
        """True for a factory `module:callable`, False for a registered architecture."""
        return ":" in self.arch

    def describe(self) -> dict[str, Any]:
        """JSON-able, for records: the name alone for a registered architecture (as records always held)."""
        if not self.foreign:
            return {"arch": self.arch}
        return {"arch": self.arch, "arch_kwargs": dict(self.arch_kwargs),
                "preprocessing": self.preprocessing.as_dict()}

    def build(self, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
        """A new, untrained network for (C, H, W) inputs in [0, 1] and `num_classes` classes (the factory's
        own output checked against both by one forward pass)."""
        if not self.foreign:
            return build_model(self.arch, tuple(input_shape), num_classes)
        self.preprocessing.check_channels(int(input_shape[0]))
        module = with_preprocessing(build_foreign(self.arch, self.arch_kwargs), self.preprocessing)
        classes = declare_input_shape(module, tuple(int(s) for s in input_shape), self.arch)
        if classes != num_classes:
            raise ConfigError(f"{self.arch} with {json.dumps(self.arch_kwargs)} gives {classes} logits; the data "
                              f"has {num_classes} classes (set its num_classes in arch_kwargs)")
        module.num_classes = num_classes
        return module

    def save(self, model: nn.Module, path: str | Path, record: dict[str, Any], overwrite: bool = False) -> Path:
        """Write the trained `model` (from `build`) with `record`: a malex model file (record in its info), or
        the bare network's weights with the record in the header."""
        if not self.foreign:
            return save_model(model, path, self.arch, info=record, overwrite=overwrite)
        path = check_output(path, overwrite=overwrite)
        net = model.net if isinstance(model, Preprocessed) else model
        header = {RECORD_KEY: json.dumps({**self.describe(), "input_shape": list(model.input_shape),
                                          "num_classes": int(model.num_classes), "info": record})}
        return write_safetensors(path, net.state_dict(), header)

    def record(self, path: str | Path) -> dict[str, Any]:
        """The record `save` wrote (no weights read); `ModelFileError` when the file holds none."""
        if not self.foreign:
            return read_description(path).get("info", {})
        return _header(Path(path))["info"]

    def load(self, path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
        """The model `save` wrote, in eval mode on `device`, taking [0, 1] inputs."""
        if not self.foreign:
            return load_model(path, device)[0]
        saved = _header(Path(path))
        spec = ModelSpec(Path(path), self.arch, self.arch_kwargs, tuple(saved["input_shape"]), self.preprocessing)
        return load(spec, device).module


def _header(path: Path) -> dict[str, Any]:
    """The `RECORD_KEY` header of a factory-built model's file: describe() plus input_shape, num_classes, info."""
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = (handle.metadata() or {}).get(RECORD_KEY)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: not a readable safetensors file ({exc})") from exc
    if header is None:
        raise ModelFileError(f"{path}: no {RECORD_KEY!r} record; expected a model a study trained")
    try:
        saved = json.loads(header)
        if not isinstance(saved["info"], dict) or len(saved["input_shape"]) != 3:
            raise TypeError("info is not an object or input_shape is not C,H,W")
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelFileError(f"{path}: the {RECORD_KEY!r} record is not valid ({exc})") from exc
    return saved
