"""Adaptive-Patch (Qi, Xie, Li, Mahloujifar and Mittal, "Revisiting the Assumption of Latent Separability
for Backdoor Defenses", ICLR 2023).

The patch-trigger sibling of Adaptive-Blend: an adaptive attack against defenses that assume trigger inputs and
clean inputs fall apart in the model's latent space. The trigger is `patches` (k) small patches, each a fixed
`size` x `size` pattern, placed apart from each other:

* every poisoned training input carries only a random subset of `train_patches` of the k patches (one, as in
  the authors' code, where each training input gets one of the k patch images), blended in at the lower
  training opacity `train_alpha`, so no single strong trigger feature is learnt;
* conservatism: besides the payload inputs (partial trigger, relabelled to the target) `cover_ratio` times as
  many cover inputs carry a partial trigger too but KEEP their true label, so the backdoor stays tied to the
  clean features of the target class rather than to a separate cluster.

At test time ALL k patches are stamped at the test opacity `alpha` (1: pasted). The authors' defaults on
CIFAR-10: poisoning rate 0.003 and twice as many cover inputs (cover_ratio 2), four patch images with training
opacities 0.5, 0.2, 0.5 and 0.3 (here one `train_alpha`, 0.4 by default, or a tuple of k values) and test
opacity 1. Their test trigger is two of the patch images; here every patch is stamped. Their patches are
hand-picked images (logos, a checkerboard square); here each is a random black-and-white pattern drawn from
`seed` (its top-left pixel white, so that it shows on a black background), or given patterns.

Placement "corners" puts the patches in the image corners, `margin` pixels in (top-left, top-right,
bottom-left, bottom-right; k <= 4); "random" draws k non-overlapping positions from `seed` for each image size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from malex.attacks.backdoor.base import PoisonConfig, Trigger, choose_cover, choose_poisoned
from malex.data.dataset import Split
from malex.errors import ConfigError, InputError

PLACEMENTS = ("corners", "random")


@dataclass(frozen=True)
class AdaptivePatchConfig:
    """`patches`: how many patches (k); `size`: their side in pixels; `placement`: "corners" or "random";
    `margin`: pixels between a patch and the image border; `alpha`: test-time opacity (all patches);
    `train_alpha`: training opacity, one value or one per patch; `train_patches`: patches per training input;
    `cover_ratio`: cover inputs (true label kept) per payload input; `seed`: the patterns and random positions."""

    patches: int = 4
    size: int = 3
    placement: str = "corners"
    margin: int = 1
    alpha: float = 1.0
    train_alpha: float | tuple[float, ...] = 0.4
    train_patches: int = 1
    cover_ratio: float = 2.0
    seed: int = 0


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_opacity(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 < v <= 1.0


def _check(x: torch.Tensor) -> None:
    if x.ndim != 4 or not x.is_floating_point():
        raise InputError(f"adaptive patch stamps float NCHW batches; got a {x.dtype} tensor of shape {tuple(x.shape)}")


class AdaptivePatch(Trigger):
    """k small patches; training inputs carry random subsets of them, faintly, and some keep their true label."""

    name = "adaptive_patch"
    config_type = AdaptivePatchConfig

    def __init__(self, config: AdaptivePatchConfig = AdaptivePatchConfig(),
                 patterns: torch.Tensor | None = None) -> None:
        c = config
        if not (_is_int(c.patches) and c.patches >= 1 and _is_int(c.size) and c.size >= 1
                and _is_int(c.margin) and c.margin >= 0):
            raise ConfigError(f"adaptive patch patches {c.patches!r}, size {c.size!r}, margin {c.margin!r}; expected "
                              "integers patches >= 1, size >= 1, margin >= 0")
        if c.placement not in PLACEMENTS:
            raise ConfigError(f"adaptive patch placement is {c.placement!r}; expected one of {', '.join(PLACEMENTS)}")
        if c.placement == "corners" and c.patches > 4:
            raise ConfigError(f"adaptive patch places {c.patches} patches in the 4 corners; expected patches <= 4 "
                              "or placement 'random'")
        alphas = tuple(c.train_alpha) if isinstance(c.train_alpha, (tuple, list)) else (c.train_alpha,) * c.patches
        if not _is_opacity(c.alpha) or len(alphas) != c.patches or not all(_is_opacity(a) for a in alphas):
            raise ConfigError(f"adaptive patch alpha {c.alpha!r}, train_alpha {c.train_alpha!r}; expected values in "
                              f"(0, 1], train_alpha one value or {c.patches} (one per patch)")
        if not _is_int(c.train_patches) or not 1 <= c.train_patches <= c.patches:
            raise ConfigError(f"adaptive patch train_patches is {c.train_patches!r}; expected an integer in "
                              f"1..{c.patches} (the patches each training input carries)")
        if not isinstance(c.cover_ratio, (int, float)) or isinstance(c.cover_ratio, bool) \
                or not math.isfinite(c.cover_ratio) or c.cover_ratio < 0:
            raise ConfigError(f"adaptive patch cover_ratio is {c.cover_ratio!r}; expected a finite value >= 0")
        if not _is_int(c.seed):
            raise ConfigError(f"adaptive patch seed is {c.seed!r}; expected an integer")
        if patterns is not None and (patterns.ndim != 4 or tuple(patterns.shape[0:1]) != (c.patches,)
                                     or tuple(patterns.shape[2:]) != (c.size, c.size)
                                     or patterns.min() < 0 or patterns.max() > 1):
            raise ConfigError(f"adaptive patch patterns must be a ({c.patches}, C, {c.size}, {c.size}) tensor with "
                              f"values in [0, 1]; got shape {tuple(patterns.shape)}")
        self.config = config
        self._train_alphas = torch.tensor(alphas, dtype=torch.float32)
        self._patterns = patterns

    def patterns(self, channels: int) -> torch.Tensor:
        """The (k, C, size, size) patterns: random black-and-white ones from the seed unless some were given."""
        c = self.config
        if self._patterns is not None:
            if self._patterns.shape[1] != channels:
                raise ConfigError(f"adaptive patch patterns have {self._patterns.shape[1]} channels; images have "
                                  f"{channels}")
            return self._patterns.float()
        gen = torch.Generator().manual_seed(c.seed)
        bits = torch.randint(0, 2, (c.patches, channels, c.size, c.size), generator=gen).float()
        bits[:, :, 0, 0] = 1.0  # at least one white pixel: the patch shows on a black background
        return bits

    def positions(self, h: int, w: int) -> list[tuple[int, int]]:
        """(top, left) of each patch in an `h` x `w` image; the patches never overlap."""
        c = self.config
        if c.placement == "corners":
            need_w = (2 if c.patches >= 2 else 1) * (c.size + c.margin)  # side by side along the top
            need_h = (2 if c.patches >= 3 else 1) * (c.size + c.margin)  # and along the bottom
            if need_w > w or need_h > h:
                raise ConfigError(f"{c.patches} adaptive patches of {c.size}px with a {c.margin}px margin do not fit "
                                  f"the corners of a {h}x{w} image")
            bottom, right = h - c.margin - c.size, w - c.margin - c.size
            return [(c.margin, c.margin), (c.margin, right), (bottom, c.margin), (bottom, right)][:c.patches]
        span_h, span_w = h - 2 * c.margin - c.size + 1, w - 2 * c.margin - c.size + 1
        if span_h < 1 or span_w < 1:
            raise ConfigError(f"an adaptive patch of {c.size}px with a {c.margin}px margin does not fit a {h}x{w} "
                              "image")
        gen = torch.Generator().manual_seed(c.seed + 1)  # a stream apart from the patterns
        placed: list[tuple[int, int]] = []
        for _ in range(1000 * c.patches):
            top = c.margin + int(torch.randint(0, span_h, (1,), generator=gen))
            left = c.margin + int(torch.randint(0, span_w, (1,), generator=gen))
            if all(abs(top - t) >= c.size or abs(left - lf) >= c.size for t, lf in placed):
                placed.append((top, left))
                if len(placed) == c.patches:
                    return placed
        raise ConfigError(f"cannot place {c.patches} non-overlapping {c.size}px adaptive patches in a {h}x{w} image; "
                          "expected fewer or smaller patches")

    def stamps(self, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, 1, H, W) {0, 1} masks of the patches and the (k, C, H, W) images holding their patterns."""
        ch, h, w = shape
        s = self.config.size
        masks = torch.zeros(self.config.patches, 1, h, w)
        images = torch.zeros(self.config.patches, ch, h, w)
        for j, ((top, left), pattern) in enumerate(zip(self.positions(h, w), self.patterns(ch))):
            masks[j, :, top:top + s, left:left + s] = 1.0
            images[j, :, top:top + s, left:left + s] = pattern
        return masks, images

    def _stamp(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x blended with each patch j at opacity weights[n, j] (0: patch left out); a new tensor."""
        masks, images = (t.to(device=x.device, dtype=x.dtype) for t in self.stamps(tuple(x.shape[-3:])))
        out = x.clone()
        for j in range(self.config.patches):
            a = weights[:, j].to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1) * masks[j]
            out = out + a * (images[j] - out)  # patches never overlap: each pixel is blended at most once
        return out

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        _check(x)
        return self._stamp(x, torch.full((x.shape[0], self.config.patches), float(self.config.alpha)))

    def random_subsets(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """(n, k) {0, 1}: for each input, a random subset of `train_patches` of the k patches."""
        k = self.config.patches
        order = torch.rand(n, k, generator=gen).argsort(dim=1)
        chosen = torch.zeros(n, k)
        chosen.scatter_(1, order[:, :self.config.train_patches], 1.0)
        return chosen

    def apply_partial(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The training-time trigger: a random subset of the patches per input, at the training opacity."""
        _check(x)
        return self._stamp(x, self.random_subsets(x.shape[0], gen) * self._train_alphas)

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
        return {"name": self.name, **asdict(self.config), "custom_patterns": self._patterns is not None}
