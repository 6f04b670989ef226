"""Any PyTorch image classifier as a model malex can guard: `load(ModelSpec(...))`.

The file's kind is read from its content, not its name:
- "malex": a safetensors file whose header names a malex architecture (`malex.models.io.load_model`);
- "state_dict": weights (a `.safetensors` without a malex header, or a `torch.save(model.state_dict())` file,
  read with `torch.load(weights_only=True)`) for the factory `--arch module:callable` (imported from the
  current folder or `sys.path`, called with `arch_kwargs`);
- "torchscript": a `torch.jit.save` archive; "export": a `torch.export.save` program (`.pt2`). Both become a
  module with named layers (`malex.models.graphs`).
A pickled module is never loaded; ONNX is refused (no converter works beside this torch: see `ONNX_REFUSAL`).
Declared preprocessing (value range, mean/std) is wrapped inside the loaded module, so it takes [0, 1] inputs.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pickle
import sys
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from malex.device import model_device
from malex.errors import ConfigError, ModelFileError
from malex.models.graphs import load_export, load_torchscript
from malex.models.io import check_weights, load_model
from malex.models.preprocess import Preprocessing, with_preprocessing

KINDS = ("malex", "state_dict", "torchscript", "export")
ONNX_REFUSAL = ("ONNX models are not supported: malex's detectors hook named layers and re-run the dense head "
                "with other weights, which an ONNX runtime session cannot do, and the ONNX-to-PyTorch converter "
                "(onnx2torch) needs torchvision; export the PyTorch model with torch.export.save (.pt2) instead")


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from and what its inputs are.

    `arch` ("module:callable") builds the network for a weights-only file, with `arch_kwargs`; `input_shape`
    (C, H, W) is needed when neither the file nor the network records it; `preprocessing` maps [0, 1] inputs
    to what the network was trained on."""

    path: Path
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, int, int] | None = None
    preprocessing: Preprocessing = Preprocessing()

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if self.arch is not None and (not isinstance(self.arch, str) or self.arch.count(":") != 1
                                      or not all(self.arch.split(":"))):
            raise ConfigError(f"--arch {self.arch!r}; expected module:callable, e.g. my_pkg.nets:resnet18")
        if not isinstance(self.arch_kwargs, dict):
            raise ConfigError(f"--arch-kwargs {self.arch_kwargs!r}; expected a JSON object")
        if self.input_shape is not None:
            shape = tuple(self.input_shape)
            if len(shape) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
                raise ConfigError(f"--input-shape {self.input_shape!r}; expected three positive integers C,H,W")
            object.__setattr__(self, "input_shape", shape)

    def filled_from(self, recorded: dict[str, Any] | None) -> "ModelSpec":
        """This spec completed by a guard's record of the model it was fitted for (`LoadedModel.description`):
        input shape, preprocessing and factory arguments not given here are taken from it; one given here that
        differs is a `ConfigError`. The factory itself is never taken from a file: `arch` must be given, and
        must match."""
        if not recorded:
            return self
        if recorded.get("kind") == "state_dict" and self.arch not in (None, recorded.get("arch")):
            raise ConfigError(f"--arch {self.arch!r}, but the guard was fitted for {recorded.get('arch')!r}")
        updates: dict[str, Any] = {}
        given = {"input_shape": self.input_shape, "preprocessing": None if self.preprocessing.identity
                 else self.preprocessing, "arch_kwargs": self.arch_kwargs or None}
        saved = {"input_shape": tuple(recorded["input_shape"]) if recorded.get("input_shape") else None,
                 "preprocessing": Preprocessing.from_dict(recorded.get("preprocessing") or {}),
                 "arch_kwargs": recorded.get("arch_kwargs") or {}}
        for name, value in given.items():
            if value is None:
                updates[name] = saved[name]
            elif value != saved[name]:
                raise ConfigError(f"{name.replace('_', ' ')} {_plain(value)}, but the guard was fitted with "
                                  f"{_plain(saved[name])}; give the same, or leave it out to use the guard's")
        return replace(self, **updates)


def _plain(value: Any) -> str:
    return json.dumps(value.as_dict() if isinstance(value, Preprocessing) else value)


@dataclass(frozen=True)
class LoadedModel:
    """The module (eval mode, [0, 1] inputs, `input_shape` and `num_classes` set when known) and its
    JSON-able description: kind, arch, arch_kwargs, input_shape, num_classes, preprocessing, file_sha256."""

    module: nn.Module
    description: dict[str, Any]

    @property
    def input_shape(self) -> tuple[int, int, int] | None:
        shape = getattr(self.module, "input_shape", None)
        return tuple(shape) if shape is not None else None

    def with_input_shape(self, shape: tuple[int, int, int]) -> "LoadedModel":
        """The model declared to take (C, H, W) inputs `shape` (checked by a forward pass)."""
        Preprocessing.from_dict(self.description["preprocessing"]).check_channels(int(shape[0]))
        num_classes = declare_input_shape(self.module, tuple(int(s) for s in shape), str(self.description["path"]))
        return LoadedModel(self.module, {**self.description, "input_shape": list(shape), "num_classes": num_classes})


def file_sha256(path: Path) -> str:
    """SHA-256 of the file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_kind(path: Path) -> str:
    """"malex", "state_dict", "torchscript" or "export", read from the file's content."""
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    if path.suffix.lower() == ".onnx":
        raise ModelFileError(f"{path}: {ONNX_REFUSAL}")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
        if any(n.endswith("archive_format") or "/models/" in n for n in names):
            return "export"
        return "state_dict"
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        if path.suffix.lower() == ".safetensors":
            raise ModelFileError(f"{path}: not a readable safetensors file ({exc}); expected a malex model file "
                                 "or safetensors weights") from exc
        return "state_dict"  # not safetensors: torch.load(weights_only=True) decides
    return "malex" if "malex" in meta else "state_dict"


def _import_factory(arch: str) -> Any:
    """The callable `module:callable` names, imported with the current folder on the path."""
    module_name, _, attr = arch.partition(":")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ConfigError(f"--arch {arch!r}: no module {module_name!r} in the current folder ({cwd}) or on "
                              "the Python path; expected module:callable of an importable module") from exc
        raise ConfigError(f"--arch {arch!r}: importing {module_name!r} failed ({exc})") from exc
    except Exception as exc:  # the user's module may fail to import in any way
        raise ConfigError(f"--arch {arch!r}: importing {module_name!r} failed ({type(exc).__name__}: {exc})") from exc
    finally:
        if added:
            sys.path.remove(cwd)
    factory = getattr(module, attr, None)
    if not callable(factory):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ConfigError(f"--arch {arch!r}: module {module_name!r} has no callable {attr!r}; "
                          f"it defines {', '.join(found[:12]) or 'none'}")
    return factory


def build_foreign(arch: str, arch_kwargs: dict[str, Any]) -> nn.Module:
    """`module:callable(**arch_kwargs)`, which must return an nn.Module."""
    factory = _import_factory(arch)
    try:
        net = factory(**arch_kwargs)
    except Exception as exc:  # the user's factory may fail in any way
        raise ConfigError(f"--arch {arch!r} with --arch-kwargs {json.dumps(arch_kwargs)} failed "
                          f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(net, nn.Module):
        raise ConfigError(f"--arch {arch!r} returned a {type(net).__name__}; expected a torch.nn.Module")
    return net


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Named tensors from a safetensors file or a `torch.save(model.state_dict())` file (weights_only)."""
    if path.suffix.lower() == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelFileError(f"{path}: not a readable safetensors file ({exc})") from exc
    with path.open("rb") as handle:
        first = handle.read(1)
    if not zipfile.is_zipfile(path) and first != b"\x80":  # neither torch.save's zip nor its legacy pickle
        raise ModelFileError(f"{path}: not a PyTorch weights file; expected torch.save(model.state_dict()), a "
                             ".safetensors, TorchScript or torch.export (.pt2) file")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise ModelFileError(f"{path}: holds pickled objects other than tensors (a whole model saved with "
                             "torch.save(model)?); malex loads no pickled code: save model.state_dict() instead, "
                             "or a TorchScript / torch.export file") from exc
    except (RuntimeError, ValueError, EOFError, OSError) as exc:
        raise ModelFileError(f"{path}: not a PyTorch weights file ({' '.join(str(exc).split())[:160]}); expected "
                             "torch.save(model.state_dict()) or a .safetensors file") from exc
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        what = type(state).__name__ if not isinstance(state, dict) else "a dict with entries that are not tensors"
        raise ModelFileError(f"{path}: holds {what}; expected a state_dict (names -> tensors): save "
                             "model.state_dict()")
    return state


def _network(spec: ModelSpec, kind: str) -> tuple[nn.Module, dict[str, Any]]:
    """The bare network of `spec` and what its file says of it."""
    path = spec.path
    if kind == "malex":
        if spec.arch is not None:
            raise ConfigError(f"{path} is a malex model file, which names its architecture; leave out --arch")
        return load_model(path)
    if kind == "state_dict":
        if spec.arch is None:
            raise ConfigError(f"{path} holds weights only; give the network that takes them: --arch module:callable")
        net = build_foreign(spec.arch, spec.arch_kwargs)
        tensors = read_state_dict(path)
        check_weights(net.state_dict(), tensors, str(path), f"the network of --arch {spec.arch}")
        net.load_state_dict(tensors)
        return net, {}
    if spec.arch is not None:
        raise ConfigError(f"{path} is a {kind} file, which holds its network; leave out --arch")
    net = load_export(path) if kind == "export" else load_torchscript(path, spec.input_shape)
    for name, tensor in net.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ModelFileError(f"{path}: weight {name} contains NaN or infinite values")
    return net, {}


def declare_input_shape(module: nn.Module, shape: tuple[int, int, int], where: str) -> int:
    """Set `module.input_shape` (checked against one it already has) after one forward pass on zeros of that
    shape gives a batch of logits; returns the number of classes (also set as `num_classes` when missing)."""
    own = getattr(module, "input_shape", None)
    if own is not None and tuple(own) != tuple(shape):
        raise ConfigError(f"{where}: --input-shape {tuple(shape)}, but the model takes {tuple(own)}")
    try:
        with torch.no_grad():
            logits = module(torch.zeros((2, *shape), device=model_device(module)))
    except Exception as exc:  # any failure of the user's forward pass means the shape is wrong for it
        raise ModelFileError(f"{where}: the model does not take inputs of shape {tuple(shape)} "
                             f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from exc
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != 2:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ModelFileError(f"{where}: the model returns {got} for 2 inputs; expected logits of shape (2, classes)")
    module.input_shape = tuple(shape)
    if getattr(module, "num_classes", None) is None:
        module.num_classes = int(logits.shape[1])
    return int(logits.shape[1])


def _program_shape(net: nn.Module) -> tuple[int, int, int] | None:
    """The (C, H, W) an exported program fixed, when it fixed all three."""
    graph = getattr(net, "graph", None)
    if graph is None:
        return None
    for node in graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(val, torch.Tensor) and val.ndim == 4 and all(isinstance(s, int) for s in val.shape[1:]):
            return tuple(val.shape[1:])
    return None


def load(spec: ModelSpec, device: str | torch.device = "cpu") -> LoadedModel:
    """The model `spec` names, in eval mode on `device`, taking [0, 1] inputs (declared preprocessing wrapped
    inside), with `input_shape` and `num_classes` set when the shape is known (else `with_input_shape` later).
    A bad file is a `ModelFileError`, a bad spec a `ConfigError`; both say what was expected."""
    kind = source_kind(spec.path)
    net, saved = _network(spec, kind)
    net.eval()
    shape = spec.input_shape or getattr(net, "input_shape", None) or _program_shape(net)
    module = with_preprocessing(net, spec.preprocessing).to(device).eval()
    description = {**saved, "kind": kind, "path": str(spec.path), "arch": spec.arch or saved.get("arch"),
                   "arch_kwargs": dict(spec.arch_kwargs), "input_shape": None, "num_classes": None,
                   "preprocessing": spec.preprocessing.as_dict(), "file_sha256": file_sha256(spec.path)}
    loaded = LoadedModel(module, description)
    return loaded.with_input_shape(tuple(shape)) if shape is not None else loaded
