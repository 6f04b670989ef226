"""Preprocessing a model declares (value range, mean/std), moved inside the model.

malex's attacks and detectors, and the service's decoders, hand every model inputs in [0, 1]. A model trained
on other inputs (0..255, or normalised by a dataset's mean and std) declares its `Preprocessing`, and
`with_preprocessing` wraps it so that the wrapped model takes [0, 1] inputs and feeds the network what it was
trained on: x -> lo + x (hi - lo) -> (x - mean) / std, with mean and std in the value range's units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from malex.errors import ConfigError
from malex.models.classifier import Normalize


def _floats(values: Sequence[float] | None, name: str) -> tuple[float, ...] | None:
    if values is None:
        return None
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} is {values!r}; expected numbers") from exc
    if not out or not all(math.isfinite(v) for v in out):
        raise ConfigError(f"{name} is {values!r}; expected one or more finite numbers")
    return out


@dataclass(frozen=True)
class Preprocessing:
    """What the network expects of an input in [0, 1]: scaled to `value_range`, then `(x - mean) / std` per
    channel (mean and std in the value range's units; both or neither; one value, or one per channel)."""

    value_range: tuple[float, float] = (0.0, 1.0)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        value_range = _floats(self.value_range, "value range")
        if value_range is None or len(value_range) != 2 or not value_range[0] < value_range[1]:
            raise ConfigError(f"value range is {self.value_range!r}; expected two numbers LOW,HIGH with LOW < HIGH")
        mean, std = _floats(self.mean, "mean"), _floats(self.std, "std")
        if (mean is None) != (std is None):
            raise ConfigError("give both --mean and --std, or neither")
        if mean is not None and len(mean) != len(std):
            raise ConfigError(f"{len(mean)} mean values and {len(std)} std values; expected as many of each")
        if std is not None and min(std) <= 0:
            raise ConfigError(f"std is {std}; expected positive values")
        object.__setattr__(self, "value_range", value_range)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @property
    def identity(self) -> bool:
        """True when the network takes [0, 1] inputs as they are."""
        return self.value_range == (0.0, 1.0) and self.mean is None

    def check_channels(self, channels: int) -> None:
        """`ConfigError` unless mean and std hold one value or one per input channel."""
        if self.mean is not None and len(self.mean) not in (1, channels):
            raise ConfigError(f"{len(self.mean)} mean/std values for a model of {channels} input channels; "
                              f"expected 1 or {channels}")

    def as_dict(self) -> dict[str, Any]:
        """JSON-able: {"value_range": [lo, hi], "mean": [...] or None, "std": [...] or None}."""
        return {"value_range": list(self.value_range), "mean": None if self.mean is None else list(self.mean),
                "std": None if self.std is None else list(self.std)}

    @classmethod
    def from_dict(cls, data: Any) -> "Preprocessing":
        """The inverse of `as_dict` (checked)."""
        if not isinstance(data, dict) or set(data) - {"value_range", "mean", "std"}:
            raise ConfigError(f"preprocessing is {data!r}; expected value_range, mean and std")
        return cls(tuple(data.get("value_range") or (0.0, 1.0)), data.get("mean"), data.get("std"))


class Preprocess(nn.Module):
    """[0, 1] inputs -> the network's value range -> mean/std normalised (constants stored as buffers)."""

    def __init__(self, prep: Preprocessing) -> None:
        super().__init__()
        lo, hi = prep.value_range
        self.register_buffer("low", torch.tensor(lo, dtype=torch.float32))
        self.register_buffer("span", torch.tensor(hi - lo, dtype=torch.float32))
        self.normalize = Normalize(prep.mean, prep.std) if prep.mean is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.low + x * self.span
        return self.normalize(x) if self.normalize is not None else x


class Preprocessed(nn.Module):
    """`net` behind its declared `Preprocess`; takes [0, 1] inputs. A malex model's probe layers are kept."""

    def __init__(self, net: nn.Module, prep: Preprocessing) -> None:
        super().__init__()
        self.preprocess = Preprocess(prep)
        self.net = net
        layers = getattr(net, "probe_layers", None)
        if layers:
            self.probe_layers = tuple(f"net.{name}" for name in layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.preprocess(x))


def with_preprocessing(net: nn.Module, prep: Preprocessing) -> nn.Module:
    """`net` itself when it takes [0, 1] inputs as they are, else `Preprocessed(net, prep)`."""
    return net if prep.identity else Preprocessed(net, prep)
