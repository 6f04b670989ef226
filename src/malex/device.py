"""Device selection: CPU by default, a GPU only when asked for and present."""

from __future__ import annotations

import torch

from malex.errors import ConfigError


def select_device(name: str = "cpu") -> torch.device:
    """Resolve 'cpu', 'cuda', 'cuda:N' or 'auto' (a GPU when one is present, else the CPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but no CUDA GPU is available; use 'cpu' or 'auto'")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r}; expected 'cpu', 'cuda', 'cuda:N' or 'auto'") from exc


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
