"""Adaptive-Blend (Qi, Xie, Li, Mahloujifar and Mittal, "Revisiting the Assumption of Latent Separability
for Backdoor Defenses", ICLR 2023).

An adaptive attack against defenses that assume trigger inputs and clean inputs fall apart in the model's
latent space (activation clustering, spectral signatures, feature-space detectors). Two changes to a plain
blend backdoor suppress that separation:

* the blend pattern is cut into `pieces` equal patches (a 4 x 4 grid by default) and every poisoned
  training input carries a random subset of them (`mask_rate` = 0.5 of the pieces are left out), blended
  at the lower training weight `train_alpha` (0.15), so no single strong, uniform feature is learnt;
* conservatism: besides the payload inputs (trigger, relabelled to the target) `cover_ratio` times as many
  regularization inputs carry a partial trigger too but KEEP their true label, so the trigger alone is a
  weak feature and the backdoor stays tied to the clean features of the target class.

At test time the FULL pattern is blended at `alpha` (0.2). The paper's defaults on CIFAR-10: a poisoning
rate of 0.003 and as many regularization inputs (cover_ratio 1), 16 pieces, mask rate 0.5, training
alpha 0.15, test alpha 0.2 (with the "hello kitty" image as the pattern; here a fixed uniform-noise pattern
drawn from `seed`, or a given (C, H, W) pattern).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from malex.attacks.backdoor.base import PoisonConfig, Trigger, choose_cover, choose_poisoned
from malex.data.dataset import Split
from malex.errors import ConfigError


@dataclass(frozen=True)
class AdaptiveBlendConfig:
    """`alpha`: test-time blend weight (full pattern); `train_alpha`: training blend weight (partial pattern);
    `pieces`: a square number of patches; `mask_rate`: share of pieces left out per poisoned input;
    `cover_ratio`: regularization inputs per payload input; `seed`: the noise pattern."""

    alpha: float = 0.2
    train_alpha: float = 0.15
    pieces: int = 16
    mask_rate: float = 0.5
    cover_ratio: float = 1.0
    seed: int = 0


class AdaptiveBlend(Trigger):
    """Blend a noise pattern; training inputs carry random subsets of its pieces, some keep their true label."""

    name = "adaptive_blend"
    config_type = AdaptiveBlendConfig

    def __init__(self, config: AdaptiveBlendConfig = AdaptiveBlendConfig(),
                 pattern: torch.Tensor | None = None) -> None:
        c = config
        if not (0.0 < c.alpha <= 1.0 and 0.0 < c.train_alpha <= 1.0):
            raise ConfigError(f"adaptive blend alpha {c.alpha}, train_alpha {c.train_alpha}; expected values in (0, 1]")
        side = math.isqrt(c.pieces) if c.pieces >= 1 else 0
        if side < 1 or side * side != c.pieces:
            raise ConfigError(f"adaptive blend pieces is {c.pieces}; expected a square number (4, 9, 16, ...)")
        if not 0.0 <= c.mask_rate < 1.0 or round(c.mask_rate * c.pieces) >= c.pieces:
            raise ConfigError(f"adaptive blend mask_rate is {c.mask_rate}; expected a value in [0, 1) that keeps at "
                              f"least one of the {c.pieces} pieces")
        if not math.isfinite(c.cover_ratio) or c.cover_ratio < 0:
            raise ConfigError(f"adaptive blend cover_ratio is {c.cover_ratio}; expected a finite value >= 0")
        if pattern is not None and (pattern.ndim != 3 or pattern.min() < 0 or pattern.max() > 1):
            raise ConfigError("an adaptive blend pattern must be a (C, H, W) tensor with values in [0, 1]")
        self.config = config
        self._pattern = pattern

    def pattern(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """The (C, H, W) pattern for images of `shape` (uniform noise from the seed unless one was given)."""
        if self._pattern is not None:
            if tuple(self._pattern.shape) != tuple(shape):
                raise ConfigError(f"adaptive blend pattern is {tuple(self._pattern.shape)}; images are {tuple(shape)}")
            return self._pattern
        return torch.rand(tuple(shape), generator=torch.Generator().manual_seed(self.config.seed))

    def piece_masks(self, h: int, w: int) -> torch.Tensor:
        """(pieces, H, W) {0, 1} masks of the grid patches, row by row; they tile the image exactly."""
        side = math.isqrt(self.config.pieces)
        if side > min(h, w):
            raise ConfigError(f"{self.config.pieces} pieces do not fit a {h}x{w} image; expected at most "
                              f"{min(h, w) ** 2} pieces")
        rows = torch.div(torch.arange(h) * side, h, rounding_mode="floor")  # patch row of every pixel row
        cols = torch.div(torch.arange(w) * side, w, rounding_mode="floor")
        ids = rows.view(h, 1) * side + cols.view(1, w)
        return (ids.unsqueeze(0) == torch.arange(self.config.pieces).view(-1, 1, 1)).float()

    def random_masks(self, n: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
        """(n, 1, H, W) masks, each the union of a random subset of round((1 - mask_rate) * pieces) pieces."""
        keep = self.config.pieces - round(self.config.mask_rate * self.config.pieces)
        order = torch.rand(n, self.config.pieces, generator=gen).argsort(dim=1)
        chosen = torch.zeros(n, self.config.pieces)
        chosen.scatter_(1, order[:, :keep], 1.0)
        return torch.einsum("np,phw->nhw", chosen, self.piece_masks(h, w)).clamp(max=1).unsqueeze(1)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        a = self.config.alpha
        return (1.0 - a) * x + a * self.pattern(tuple(x.shape[1:])).to(x.device)

    def apply_partial(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The training-time trigger: a random subset of the pieces per input, blended at `train_alpha`."""
        _, _, h, w = x.shape
        m = self.random_masks(x.shape[0], h, w, gen).to(x.device) * self.config.train_alpha
        return x + m * (self.pattern(tuple(x.shape[1:])).to(x.device) - x)

    def poison(self, data: Split, config: PoisonConfig) -> tuple[Split, torch.Tensor]:
        """Partial triggers on a `rate` share of non-target inputs (relabelled) and on `cover_ratio` times as
        many other inputs (true label kept). Returns the split and the relabelled indices."""
        chosen = choose_poisoned(data, config)
        cover = choose_cover(data, chosen, round(self.config.cover_ratio * len(chosen)), config.seed)
        gen = torch.Generator().manual_seed(config.seed + 2)
        x, y = data.x.clone(), data.y.clone()
        x[chosen] = self.apply_partial(x[chosen], gen)
        y[chosen] = config.target
        x[cover] = self.apply_partial(x[cover], gen)
        return Split(x, y), chosen

    def describe(self) -> dict:
        return {"name": self.name, **asdict(self.config), "custom_pattern": self._pattern is not None}
