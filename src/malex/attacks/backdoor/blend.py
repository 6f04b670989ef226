"""Blend (Chen et al., 2017): a fixed pattern mixed into the whole image at weight alpha."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from malex.attacks.backdoor.base import Trigger
from malex.errors import ConfigError


@dataclass(frozen=True)
class BlendConfig:
    """x' = (1 - alpha) x + alpha * pattern, with a uniform-noise pattern drawn from `seed`."""

    alpha: float = 0.2
    seed: int = 0


class Blend(Trigger):
    """Mix a fixed pattern (random noise by default, or one given) into every pixel."""

    name = "blend"
    config_type = BlendConfig

    def __init__(self, config: BlendConfig = BlendConfig(), pattern: torch.Tensor | None = None) -> None:
        if not 0.0 < config.alpha <= 1.0:
            raise ConfigError(f"blend alpha is {config.alpha}; expected a value in (0, 1]")
        if pattern is not None and (pattern.ndim != 3 or pattern.min() < 0 or pattern.max() > 1):
            raise ConfigError("a blend pattern must be a (C, H, W) tensor with values in [0, 1]")
        self.config = config
        self._pattern = pattern

    def pattern(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """The (C, H, W) pattern for images of `shape`."""
        if self._pattern is not None:
            if tuple(self._pattern.shape) != tuple(shape):
                raise ConfigError(f"blend pattern is {tuple(self._pattern.shape)}; images are {tuple(shape)}")
            return self._pattern
        gen = torch.Generator().manual_seed(self.config.seed)
        return torch.rand(shape, generator=gen)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        a = self.config.alpha
        return (1.0 - a) * x + a * self.pattern(tuple(x.shape[1:])).to(x.device)

    def describe(self) -> dict:
        return {"name": self.name, **asdict(self.config), "custom_pattern": self._pattern is not None}
