"""A classifier malex did not build: a tiny residual net with batch norm and a global-average-pool head."""

from __future__ import annotations

import torch
from torch import nn


class TinyResNet(nn.Module):
    """Conv stem, one residual block (conv-BN-ReLU-conv-BN plus the skip), global average pool, one dense layer.
    It expects inputs normalised by the digits' mean and std (see train.py), not [0, 1] pixels."""

    def __init__(self, channels: int = 1, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                   nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = torch.relu(h + self.block(h))
        return self.fc(torch.flatten(self.pool(h), 1))
