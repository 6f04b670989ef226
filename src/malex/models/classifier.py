"""The shape every malex architecture shares: normalise -> features -> head.

Normalisation lives inside the model, so attacks and detectors see inputs in [0, 1]. The head holds the
dense layers; detectors that only touch dense layers (model mutation) re-run just the head on the cached
input of `head`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """(x - mean) / std per channel, with constants stored as buffers."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """An image classifier made of `normalize`, `features` (convolutions) and `head` (flatten + dense)."""

    def __init__(
        self,
        normalize: Normalize,
        features: nn.Sequential,
        head: nn.Sequential,
        input_shape: tuple[int, int, int],
        num_classes: int,
        probe_layers: Sequence[str],
    ) -> None:
        super().__init__()
        self.normalize = normalize
        self.features = features
        self.head = head
        self.input_shape = tuple(input_shape)
        self.num_classes = int(num_classes)
        self.probe_layers = tuple(probe_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.normalize(x)))
