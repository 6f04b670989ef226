"""The successful malicious inputs of an attack, with the sources they were made from."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from malex.errors import InputError


@dataclass(frozen=True)
class Crafted:
    """Malicious inputs that fooled the model (successful ones only), one row per input, on the CPU.

    `source_index` indexes the source inputs they were made from (a source may appear more than once, as in
    a targeted run toward each other class); `label` is the label the attack obtained: the target of a
    targeted or backdoor attack, the model's label for an untargeted one. `summary` holds plain numbers:
    at least `success_rate` (successes over attempts), `n` (inputs kept) and `n_tried` (attempts).
    """

    x: torch.Tensor  # (n, C, H, W) float32 in [0, 1]
    source_index: torch.Tensor  # (n,) int64
    label: torch.Tensor  # (n,) int64
    summary: dict[str, float | int]

    def __post_init__(self) -> None:
        n = self.x.shape[0]
        if self.x.ndim != 4 or self.source_index.shape != (n,) or self.label.shape != (n,):
            raise InputError(f"x {tuple(self.x.shape)}, source_index {tuple(self.source_index.shape)} and label "
                             f"{tuple(self.label.shape)}; expected (n, C, H, W), (n,) and (n,)")

    def __len__(self) -> int:
        return int(self.x.shape[0])
