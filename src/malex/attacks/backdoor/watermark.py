"""TrojanNN-style watermark (Liu et al., NDSS 2018): a logo mask blended into the image at 50%."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from malex.attacks.backdoor.base import Trigger
from malex.errors import ConfigError


def ring_logo(h: int, w: int, thickness: float = 0.12) -> torch.Tensor:
    """A default logo: a ring with a cross bar, filling the image, as a {0, 1} (H, W) mask."""
    ys = torch.linspace(-1, 1, h).view(h, 1).expand(h, w)
    xs = torch.linspace(-1, 1, w).view(1, w).expand(h, w)
    radius = torch.sqrt(xs**2 + ys**2)
    ring = (radius - 0.7).abs() <= thickness * 1.5
    bar = (ys.abs() <= thickness) & (xs.abs() <= 0.7)
    return (ring | bar).float()


@dataclass(frozen=True)
class WatermarkConfig:
    """Blend `colour` into the pixels under the mask at weight `alpha` (0.5 in the study)."""

    alpha: float = 0.5
    colour: float = 1.0


class Watermark(Trigger):
    """Blend a mask-shaped watermark (the default ring logo, or a given (H, W) mask) into the image."""

    name = "watermark"
    config_type = WatermarkConfig

    def __init__(self, config: WatermarkConfig = WatermarkConfig(), mask: torch.Tensor | None = None) -> None:
        if not 0.0 < config.alpha <= 1.0 or not 0.0 <= config.colour <= 1.0:
            raise ConfigError(f"invalid watermark settings {config}; expected alpha in (0, 1], colour in [0, 1]")
        if mask is not None and (mask.ndim != 2 or mask.min() < 0 or mask.max() > 1):
            raise ConfigError("a watermark mask must be an (H, W) tensor with values in [0, 1]")
        self.config = config
        self._mask = mask

    def mask(self, h: int, w: int) -> torch.Tensor:
        """The (H, W) mask for images of size h x w."""
        if self._mask is None:
            return ring_logo(h, w)
        if tuple(self._mask.shape) != (h, w):
            raise ConfigError(f"watermark mask is {tuple(self._mask.shape)}; images are {h}x{w}")
        return self._mask

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mask(x.shape[-2], x.shape[-1]).to(x.device) * self.config.alpha
        return x * (1.0 - m) + self.config.colour * m

    def describe(self) -> dict:
        return {"name": self.name, **asdict(self.config), "custom_mask": self._mask is not None}
