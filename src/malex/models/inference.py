"""Batched inference helpers that leave the model's mode as they found it."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from malex.device import model_device


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put `model` in eval mode for the block and restore every submodule's previous mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Logits of `model` on `x` (computed in batches, returned on the CPU)."""
    device = model_device(model)
    outs = []
    with eval_mode(model):
        for start in range(0, x.shape[0], batch_size):
            outs.append(model(x[start : start + batch_size].to(device)).float().cpu())
    if not outs:  # no inputs: run the empty batch so that the result still has the class dimension
        with eval_mode(model):
            return model(x[:0].to(device)).float().cpu()
    return torch.cat(outs)


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Predicted class ids of `model` on `x`."""
    return predict_logits(model, x, batch_size).argmax(dim=1)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Share of `x` that `model` labels as `y`."""
    return float((predict(model, x, batch_size) == y).float().mean())
