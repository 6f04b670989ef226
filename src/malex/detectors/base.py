"""The detector contract.

A detector is fitted on clean inputs only; `score` returns one float per input, higher meaning more
suspicious. Fitted state lives in attributes whose names end in "_". Detectors read the `Observation`
of the shared probe pass; `layers()` names what they need captured. Thresholding (calibration.py) and
evaluation (malex.evaluate) are separate pieces.

Every concrete detector class owns its identity: its registry `name`, its frozen-dataclass `config_class`
(the constructor takes `(model, config=None)`, None meaning that class's defaults) and its `evidence`,
which kind of malicious input its scores point to (ADVERSARIAL, BACKDOOR, or None for anomalies of no
kind in particular). A class that leaves one out is refused when it is defined.

Fitted state is kept as plain values so that it saves without pickle: torch tensors, NumPy arrays,
Python scalars and strings (or lists of them), or dicts from str to tensors or arrays. `export` turns it
into (JSON-able metadata, named tensors) and `restore` sets it back.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from malex.errors import ModelFileError, NotFittedError
from malex.probe import Observation, Probe

#: what a detector's evidence points to: inputs near a decision boundary, or inputs carrying a trigger
ADVERSARIAL, BACKDOOR = "adversarial", "backdoor"
EVIDENCE_KINDS: tuple[str | None, ...] = (ADVERSARIAL, BACKDOOR, None)


def _is_abstract(cls: type) -> bool:
    """Whether `cls` still has abstract methods (ABCMeta sets `__abstractmethods__` only after
    `__init_subclass__` has run, so it is read off the attributes)."""
    return any(getattr(getattr(cls, attr, None), "__isabstractmethod__", False) for attr in dir(cls))


def check_identity(cls: type) -> None:
    """Raise `TypeError` unless the detector class declares its own `name`, a frozen-dataclass
    `config_class` and an `evidence` in EVIDENCE_KINDS."""
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not name:
        raise TypeError(f"detector class {cls.__qualname__} declares no name of its own; expected name = '...'")
    config = getattr(cls, "config_class", None)
    if not (isinstance(config, type) and dataclasses.is_dataclass(config) and config.__dataclass_params__.frozen):
        raise TypeError(f"detector {name!r} ({cls.__qualname__}) has config_class {config!r}; "
                        "expected a frozen dataclass")
    if not hasattr(cls, "evidence") or cls.evidence not in EVIDENCE_KINDS:
        raise TypeError(f"detector {name!r} ({cls.__qualname__}) has evidence {getattr(cls, 'evidence', '<unset>')!r}; "
                        f"expected one of {EVIDENCE_KINDS}")


class Detector(ABC):
    """Base class of every detector."""

    #: the registry name (error messages and saved files use it)
    name: ClassVar[str]
    #: the frozen dataclass of its settings; `config_class()` gives the defaults
    config_class: ClassVar[type]
    #: ADVERSARIAL, BACKDOOR or None: which kind of malicious input a high score points to
    evidence: ClassVar[str | None]
    #: attributes that `fit` sets; `check_fitted` raises until they exist
    fitted_attributes: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not _is_abstract(cls):
            check_identity(cls)

    def __init__(self, model: nn.Module, config: Any = None) -> None:
        """`config`: an instance of `config_class`; None gives its defaults."""
        self.model = model
        self.config = type(self).config_class() if config is None else config

    def layers(self) -> list[str]:
        """Probe layers this detector reads (names as in `Probe`)."""
        return []

    @abstractmethod
    def fit(self, clean: Observation, y: torch.Tensor | None = None) -> "Detector":
        """Learn from the probe pass over clean inputs (labels optional); returns self."""

    @abstractmethod
    def score(self, obs: Observation) -> np.ndarray:
        """One float64 per input; higher means more suspicious."""

    @property
    def is_fitted(self) -> bool:
        return all(hasattr(self, a) for a in self.fitted_attributes)

    def check_fitted(self) -> None:
        """Raise `NotFittedError` if `fit` has not run."""
        if not self.is_fitted:
            raise NotFittedError(f"detector {self.name!r} is not fitted; call fit() on clean inputs first")

    def state(self) -> dict:
        """Settings and fitted summary values, JSON-able (for reports)."""
        return {}

    def fitted_state(self) -> dict[str, Any]:
        """The attributes whose names end in "_" (not starting with "_")."""
        return {k: v for k, v in vars(self).items() if k.endswith("_") and not k.startswith("_")}

    def export(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Fitted state as (JSON-able metadata, tensors by name); raises `NotFittedError` when unfitted."""
        self.check_fitted()
        kinds: dict[str, str] = {}
        values: dict[str, Any] = {}
        tensors: dict[str, torch.Tensor] = {}
        for name, value in self.fitted_state().items():
            if isinstance(value, (torch.Tensor, np.ndarray)):
                kinds[name] = "ndarray" if isinstance(value, np.ndarray) else "tensor"
                tensors[name] = torch.as_tensor(value).detach().cpu().contiguous()
            elif isinstance(value, dict) and all(isinstance(v, (torch.Tensor, np.ndarray)) for v in value.values()):
                kinds[name] = "dict:" + ("ndarray" if any(isinstance(v, np.ndarray) for v in value.values()) else "tensor")
                values[name] = list(value)  # keys, in order
                for key, v in value.items():
                    tensors[f"{name}/{key}"] = torch.as_tensor(v).detach().cpu().contiguous()
            elif value is None or isinstance(value, (bool, int, float, str, list, tuple)):
                kinds[name] = "value"
                values[name] = list(value) if isinstance(value, tuple) else value
            else:
                raise TypeError(f"{self.name}: fitted attribute {name} of type {type(value).__name__} cannot be saved")
        return {"kinds": kinds, "values": values}, tensors

    def restore(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "Detector":
        """Set the fitted state written by `export`; raises `ModelFileError` when it is incomplete."""
        try:
            for name, kind in meta["kinds"].items():
                if kind == "value":
                    setattr(self, name, meta["values"][name])
                elif kind in ("tensor", "ndarray"):
                    t = tensors[name]
                    setattr(self, name, t.numpy() if kind == "ndarray" else t)
                elif kind.startswith("dict:"):
                    as_np = kind == "dict:ndarray"
                    setattr(self, name, {k: tensors[f"{name}/{k}"].numpy() if as_np else tensors[f"{name}/{k}"]
                                         for k in meta["values"][name]})
                else:
                    raise KeyError(kind)
        except (KeyError, TypeError) as exc:
            raise ModelFileError(f"{self.name}: saved state is incomplete or malformed ({exc})") from exc
        self.check_fitted()
        self._after_restore()
        return self

    def _after_restore(self) -> None:
        """Rebuild derived, unsaved helpers from restored state (override when needed)."""

    def observe(self, x: torch.Tensor, batch_size: int = 256) -> Observation:
        """A probe pass capturing just what this detector needs (for standalone use)."""
        return Probe(self.model, self.layers()).run(x, batch_size=batch_size)
