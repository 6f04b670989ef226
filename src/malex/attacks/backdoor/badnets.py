"""BadNets (Gu et al., 2017): a solid square patch stamped at a fixed position."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch

from malex.attacks.backdoor.base import Trigger
from malex.errors import ConfigError

Corner = Literal["bottom-right", "bottom-left", "top-right", "top-left"]


@dataclass(frozen=True)
class BadNetsConfig:
    """A `size` x `size` patch of `colour` (0..1), `margin` pixels from the chosen corner.

    The study's trigger: a 4x4 white square in the bottom-right corner with a 1-pixel margin.
    """

    size: int = 4
    corner: Corner = "bottom-right"
    margin: int = 1
    colour: float = 1.0


class BadNets(Trigger):
    """Stamp a solid square patch."""

    name = "badnets"
    config_type = BadNetsConfig

    def __init__(self, config: BadNetsConfig = BadNetsConfig()) -> None:
        if config.size < 1 or config.margin < 0 or not 0.0 <= config.colour <= 1.0:
            raise ConfigError(f"invalid BadNets settings {config}; expected size >= 1, margin >= 0, colour in [0, 1]")
        if config.corner not in ("bottom-right", "bottom-left", "top-right", "top-left"):
            raise ConfigError(f"unknown corner {config.corner!r}")
        self.config = config

    def _window(self, h: int, w: int) -> tuple[slice, slice]:
        c = self.config
        if c.size + c.margin > min(h, w):
            raise ConfigError(f"a {c.size}px patch with {c.margin}px margin does not fit a {h}x{w} image")
        top = c.corner.startswith("top")
        left = c.corner.endswith("left")
        r0 = c.margin if top else h - c.margin - c.size
        c0 = c.margin if left else w - c.margin - c.size
        return slice(r0, r0 + c.size), slice(c0, c0 + c.size)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = self._window(x.shape[-2], x.shape[-1])
        out = x.clone()
        out[..., rows, cols] = self.config.colour
        return out

    def describe(self) -> dict:
        return {"name": self.name, **asdict(self.config)}
