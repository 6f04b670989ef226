"""Feature squeezing (Xu, Evans and Qi, "Feature Squeezing: Detecting Adversarial Examples in Deep Neural
Networks", NDSS 2018).

Squeezing an input (fewer colour bits, a median filter) removes most of the feature space an adversary
exploits while barely changing what the model sees in a clean input. An input whose prediction moves a
lot when squeezed is suspicious. Score = the largest, over the squeezers, L1 distance between the
softmax of the input (the logits of the probe pass) and the softmax of its squeezed version (forward
passes of their own, all squeezers of a batch at once).

Squeezers are named by strings: "bits:B" keeps B bits per channel (1 <= B <= 8), "median:K" is a K x K
median filter (2 <= K <= 9). The median filter follows `scipy.ndimage.median_filter` with its default
mode='reflect', as the paper's code does: the edge is repeated in the padding (d c b a | a b c d | d c b a),
a window of even size K covers K // 2 pixels before the centre and K // 2 - 1 after, and the median of an
even-sized window is its upper middle value. The paper's defaults: 1 bit and a 2 x 2 median filter for
greyscale images (MNIST), 5 bits and a 2 x 2 median filter for colour ones (CIFAR-10).

The method is training-free; `fit` records how many clean inputs it saw, the squeezers in use, and
quantiles of the clean scores (for information; thresholds are set by calibration).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from malex.detectors.base import ADVERSARIAL, Detector
from malex.device import model_device
from malex.errors import ConfigError, InputError
from malex.models.inference import eval_mode
from malex.probe import Observation

GREY_SQUEEZERS = ("bits:1", "median:2")
COLOUR_SQUEEZERS = ("bits:5", "median:2")
#: clean-score quantiles kept by `fit`
QUANTILES = (0.5, 0.9, 0.95, 0.99)


def parse_squeezer(spec: str) -> tuple[str, int]:
    """("bits", B) or ("median", K) from "bits:B" / "median:K"; raises `ConfigError` when malformed."""
    kind, _, value = str(spec).partition(":")
    try:
        param = int(value)
    except ValueError:
        param = None
    if kind == "bits" and param is not None and 1 <= param <= 8:
        return kind, param
    if kind == "median" and param is not None and 2 <= param <= 9:
        return kind, param
    raise ConfigError(f"unknown squeezer {spec!r}; expected 'bits:B' with B in 1..8 or 'median:K' with K in 2..9")


@dataclass(frozen=True)
class SqueezeConfig:
    """`squeezers`: squeezer names (None: the paper's defaults for the model's channel count, greyscale
    ("bits:1", "median:2"), colour ("bits:5", "median:2")); `batch_size`: inputs per forward pass (each is
    run once per squeezer); `max_fit`: at most this many clean inputs are scored at fit time."""

    squeezers: tuple[str, ...] | None = None
    batch_size: int = 512
    max_fit: int = 2000

    def __post_init__(self) -> None:
        if self.squeezers is not None:
            if not isinstance(self.squeezers, (list, tuple)) or len(self.squeezers) == 0:
                raise ConfigError(
                    f"squeezers are {self.squeezers!r}; expected a non-empty sequence such as ('bits:1',)"
                )
            for spec in self.squeezers:
                parse_squeezer(spec)
            object.__setattr__(self, "squeezers", tuple(self.squeezers))
        if self.batch_size < 1 or self.max_fit < 1:
            raise ConfigError(f"invalid squeezing settings {self}; expected batch_size >= 1 and max_fit >= 1")


def bit_depth(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Round inputs in [0, 1] to the nearest of the 2**bits evenly spaced levels 0, 1/(2**bits - 1), ..., 1."""
    levels = 2**bits - 1
    return torch.round(x.clamp(0.0, 1.0) * levels) / levels


def _symmetric_index(size: int, before: int, after: int, device: torch.device) -> torch.Tensor:
    """Indices that pad a dimension of `size` by repeating the edge: -1 -> 0, -2 -> 1, size -> size - 1."""
    i = torch.arange(-before, size + after, device=device)
    i = torch.where(i < 0, -i - 1, i)
    return torch.where(i >= size, 2 * size - 1 - i, i)


def median_filter(x: torch.Tensor, k: int) -> torch.Tensor:
    """K x K median filter of each channel of NCHW images, as `scipy.ndimage.median_filter(size=(1, 1, k, k))`
    with mode='reflect' (the window spans k // 2 pixels before the centre; upper median for even k)."""
    if x.dim() != 4:
        raise InputError(f"median filter expects NCHW images; got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    before, after = k // 2, (k - 1) // 2
    if before > min(h, w):
        raise InputError(f"a {k}x{k} median filter needs images of at least {before} pixels a side; got {h}x{w}")
    rows = _symmetric_index(h, before, after, x.device)
    cols = _symmetric_index(w, before, after, x.device)
    padded = x.index_select(2, rows).index_select(3, cols)
    windows = padded.unfold(2, k, 1).unfold(3, k, 1).reshape(*x.shape, k * k)  # (N, C, H, W, k*k)
    return windows.kthvalue(k * k // 2 + 1, dim=-1).values


def squeeze(x: torch.Tensor, spec: str) -> torch.Tensor:
    """Apply the squeezer named `spec` ("bits:B" or "median:K") to NCHW images in [0, 1]."""
    kind, param = parse_squeezer(spec)
    return bit_depth(x, param) if kind == "bits" else median_filter(x, param)


class FeatureSqueezing(Detector):
    """Largest L1 change of the softmax output under bit-depth reduction and median filtering."""

    name = "squeeze"
    config_class = SqueezeConfig
    evidence = ADVERSARIAL
    config: SqueezeConfig
    fitted_attributes = ("n_fit_", "squeezers_")

    def _resolve(self, channels: int) -> list[str]:
        if self.config.squeezers is not None:
            return list(self.config.squeezers)
        shape = getattr(self.model, "input_shape", None)
        channels = int(shape[0]) if shape else channels
        return list(GREY_SQUEEZERS if channels == 1 else COLOUR_SQUEEZERS)

    @torch.no_grad()
    def distances(self, obs: Observation, squeezers: list[str] | None = None) -> np.ndarray:
        """(N, number of squeezers) L1 distances between the softmax of each input and of its squeezed forms."""
        squeezers = list(self.squeezers_) if squeezers is None else squeezers
        device = model_device(self.model)
        k, out = len(squeezers), []
        with eval_mode(self.model):
            for start in range(0, len(obs), self.config.batch_size):
                xb = obs.x[start : start + self.config.batch_size].to(device)
                batch = torch.cat([squeeze(xb, s) for s in squeezers])
                probs = torch.softmax(self.model(batch).float(), dim=1).view(k, xb.shape[0], -1).cpu()
                base = torch.softmax(obs.logits[start : start + self.config.batch_size].float(), dim=1)
                out.append((probs - base.unsqueeze(0)).abs().sum(dim=2).T)
        if not out:
            return np.zeros((0, k))
        return torch.cat(out).double().numpy()

    def fit(self, clean: Observation, y: torch.Tensor | None = None) -> FeatureSqueezing:
        """Fix the squeezers and record clean-score quantiles over at most `max_fit` clean inputs."""
        if len(clean) == 0:
            raise InputError("feature squeezing needs at least one clean input to fit")
        squeezers = self._resolve(int(clean.x.shape[1]))
        scores = self.distances(clean.subset(slice(0, self.config.max_fit)), squeezers).max(axis=1)
        self.squeezers_ = squeezers
        self.clean_quantiles_ = np.quantile(scores, QUANTILES)
        self.n_fit_ = int(scores.shape[0])
        return self

    def score(self, obs: Observation) -> np.ndarray:
        """Max over the squeezers of the L1 distance between softmax outputs (in [0, 2])."""
        self.check_fitted()
        return self.distances(obs).max(axis=1)

    def state(self) -> dict:
        """Settings and fitted summary values, JSON-able."""
        out: dict = {"config": asdict(self.config)}
        if self.is_fitted:
            out.update(squeezers=list(self.squeezers_), n_fit=self.n_fit_,
                       clean_quantiles=dict(zip(map(str, QUANTILES), map(float, self.clean_quantiles_))))
        return out
