"""WaNet (Nguyen and Tran, "WaNet - Imperceptible Warping-based Backdoor Attack", ICLR 2021).

The trigger is a fixed, smooth warping of the image. A k x k control grid of random displacements in
[-1, 1] (normalised to a mean absolute value of 1) is upsampled bicubically to the image size; the sampling
grid is

    grid = clamp((identity + s * displacement / size) * grid_rescale, -1, 1)

in the normalised coordinates of `torch.nn.functional.grid_sample` (align_corners=True), so `s` is the
warping strength: with the paper's k = 4, s = 0.5 a pixel moves by about a quarter of a pixel on average.

Noise mode: during poisoned training a further `cross_ratio` x rate share of the inputs ("cross" or noise
inputs) are warped by the trigger grid plus independent random noise in [-1, 1] / size per pixel, and KEEP
their true label, so that the model learns the exact warp rather than "any warping". The paper's defaults:
k = 4, s = 0.5, grid_rescale = 1, poisoning rate 0.1, cross ratio 2. The poisoning here is static (one
poisoned copy of the training split, as in backdoor-toolbox), where the paper re-draws the noise per batch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from malex.attacks.backdoor.base import PoisonConfig, Trigger, choose_cover, choose_poisoned
from malex.data.dataset import Split
from malex.errors import ConfigError, InputError


@dataclass(frozen=True)
class WaNetConfig:
    """`k`: control grid size; `s`: warping strength; `grid_rescale`: scale of the warped grid (1 = none);
    `cross_ratio`: noise inputs per poisoned input during training (0 = no noise mode); `seed`: the warp."""

    k: int = 4
    s: float = 0.5
    grid_rescale: float = 1.0
    cross_ratio: float = 2.0
    seed: int = 0


class WaNet(Trigger):
    """Warp the image with a fixed smooth random field; training adds noisy-warp inputs that keep their label."""

    name = "wanet"
    config_type = WaNetConfig

    def __init__(self, config: WaNetConfig = WaNetConfig()) -> None:
        finite = all(math.isfinite(v) for v in (config.s, config.grid_rescale, config.cross_ratio))
        if not finite or config.k < 2 or config.s <= 0 or config.grid_rescale <= 0 or config.cross_ratio < 0:
            raise ConfigError(f"invalid WaNet settings {config}; expected k >= 2, finite s > 0, grid_rescale > 0, "
                              "cross_ratio >= 0")
        self.config = config

    def displacement(self, h: int, w: int) -> torch.Tensor:
        """The (1, H, W, 2) smooth random field (x then y), mean absolute value about 1, fixed by the seed."""
        k = self.config.k
        if k > min(h, w):
            raise ConfigError(f"a {k}x{k} WaNet control grid is finer than the {h}x{w} image; "
                              f"expected k <= {min(h, w)}")
        gen = torch.Generator().manual_seed(self.config.seed)
        control = torch.rand(1, 2, k, k, generator=gen) * 2 - 1
        control = control / control.abs().mean()
        field = F.interpolate(control, size=(h, w), mode="bicubic", align_corners=True)
        return field.permute(0, 2, 3, 1)

    def grid(self, h: int, w: int) -> torch.Tensor:
        """The (1, H, W, 2) sampling grid of the trigger, in grid_sample's [-1, 1] coordinates."""
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        identity = torch.stack((xs, ys), dim=-1).unsqueeze(0)
        scale = torch.tensor([1.0 / w, 1.0 / h])  # displacement per axis relative to the image size
        warped = (identity + self.config.s * self.displacement(h, w) * scale) * self.config.grid_rescale
        return warped.clamp(-1, 1)

    @staticmethod
    def _check(x: torch.Tensor) -> None:
        if x.ndim != 4 or not x.is_floating_point():
            raise InputError(f"WaNet warps float NCHW batches; got a {x.dtype} tensor of shape {tuple(x.shape)}")

    @staticmethod
    def _sample(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        grid = grid.to(device=x.device, dtype=x.dtype).expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True).clamp(0, 1)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        if x.shape[0] == 0:
            return x.clone()
        return self._sample(x, self.grid(x.shape[-2], x.shape[-1]))

    def apply_noisy(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The noise-mode warp: the trigger grid plus independent random noise per input and pixel."""
        self._check(x)
        n, _, h, w = x.shape
        if n == 0:
            return x.clone()
        noise = (torch.rand(n, h, w, 2, generator=gen) * 2 - 1) * torch.tensor([1.0 / w, 1.0 / h])
        return self._sample(x, (self.grid(h, w) + noise).clamp(-1, 1))

    def poison(self, data: Split, config: PoisonConfig) -> tuple[Split, torch.Tensor]:
        """Warp a `rate` share of non-target inputs and relabel them; warp `cross_ratio` times as many other
        inputs with added noise and keep their labels. Returns the split and the relabelled indices."""
        chosen = choose_poisoned(data, config)
        cross = choose_cover(data, chosen, round(self.config.cross_ratio * len(chosen)), config.seed)
        x, y = data.x.clone(), data.y.clone()
        x[chosen] = self.apply(x[chosen])
        y[chosen] = config.target
        x[cross] = self.apply_noisy(x[cross], torch.Generator().manual_seed(config.seed + 2))
        return Split(x, y), chosen

    def describe(self) -> dict:
        return {"name": self.name, **asdict(self.config)}
