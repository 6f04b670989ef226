"""Supervised training of a classifier, with a progress bar."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from malex.data.dataset import Split
from malex.device import model_device
from malex.errors import ConfigError
from malex.progress import track


@dataclass(frozen=True)
class TrainConfig:
    """Adam with cosine decay; `shift` pixels of random translation as augmentation (0 = none); `flip`:
    mirror each training image left-right with probability 1/2 (for natural images such as CIFAR-10, not
    for digits or traffic signs, whose meaning a mirror can change)."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    shift: int = 0
    flip: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.epochs < 1 or self.batch_size < 1 or not math.isfinite(self.lr) or self.lr <= 0 or self.shift < 0
                or not math.isfinite(self.weight_decay) or self.weight_decay < 0):
            raise ConfigError(f"invalid training settings {self}; expected epochs, batch_size >= 1, finite lr > 0, "
                              "weight_decay >= 0, shift >= 0")


def _random_shift(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to `shift` pixels (zero padding)."""
    n, _, h, w = x.shape
    padded = nn.functional.pad(x, (shift, shift, shift, shift))
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    rows = dy.view(n, 1, 1) + torch.arange(h).view(1, h, 1)
    cols = dx.view(n, 1, 1) + torch.arange(w).view(1, 1, w)
    picked = padded[torch.arange(n).view(n, 1, 1), :, rows, cols]  # (n, h, w, C)
    return picked.permute(0, 3, 1, 2).contiguous()


def _random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    mirror = torch.rand(x.shape[0], generator=gen) < 0.5
    return torch.where(mirror.view(-1, 1, 1, 1), x.flip(3), x)


def train_classifier(model: nn.Module, data: Split, config: TrainConfig = TrainConfig(), progress: bool = True) -> nn.Module:
    """Train `model` in place on `data` with cross-entropy; returns the model in eval mode."""
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    device = model_device(model)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = (len(data) + config.batch_size - 1) // config.batch_size
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in track(range(config.epochs), "training (epochs)", enabled=progress):
        order = torch.randperm(len(data), generator=gen)
        for start in range(0, len(data), config.batch_size):
            idx = order[start : start + config.batch_size]
            xb, yb = data.x[idx], data.y[idx]
            if config.shift:
                xb = _random_shift(xb, config.shift, gen)
            if config.flip:
                xb = _random_flip(xb, gen)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb.to(device)), yb.to(device))
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()
