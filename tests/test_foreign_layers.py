"""Foreign models' data layout and probe layers: NHWC arrays are read by the model's first convolution's channels,
and the feature-space detectors read stage outputs (after the activation, after the residual sum) found by a traced
dummy pass, instead of every raw conv output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from malex.errors import InputError
from malex.guard import Guard, GuardConfig


class SeparableFC(nn.Module):
    """3 channels, group norm, SiLU, depthwise-separable blocks (one at stride 2), one dense layer named `fc`."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU())
        self.blocks = nn.Sequential(
            nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), nn.Conv2d(8, 16, 1), nn.GroupNorm(4, 16), nn.SiLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 16, 1), nn.GroupNorm(4, 16), nn.SiLU())
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def uint8_nhwc(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def test_a_foreign_net_without_input_shape_takes_nhwc_uint8_arrays_by_its_channels():
    model = SeparableFC().eval()
    assert getattr(model, "input_shape", None) is None
    guard = Guard(model, GuardConfig(detectors=("mahalanobis", "msp"), fpr=0.2, progress=False))
    guard.fit(uint8_nhwc(100))
    x = uint8_nhwc(5, seed=1)
    result = guard.screen(x)
    expected = model(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255).argmax(1).numpy()
    assert (result.prediction == expected).all() and len(result) == 5


def test_a_wrong_channel_count_is_one_input_error_naming_both_layouts():
    guard = Guard(SeparableFC().eval(), GuardConfig(detectors=("msp",), progress=False))
    wrong = np.zeros((30, 32, 32, 4), dtype=np.uint8)
    with pytest.raises(InputError) as info:
        guard.fit(wrong)
    message = str(info.value)
    assert "\n" not in message and "(30, 32, 32, 4)" in message
    assert "(N, 3, H, W)" in message and "(N, H, W, 3)" in message


def test_input_channels_is_the_first_convolutions_and_none_without_one():
    from malex.models.anatomy import input_channels

    assert input_channels(SeparableFC()) == 3
    assert input_channels(nn.Sequential(nn.Flatten(), nn.Linear(12, 2))) is None
