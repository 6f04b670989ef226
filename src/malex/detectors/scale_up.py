"""SCALE-UP (Guo et al., ICLR 2023): scaled prediction consistency of pixel-amplified inputs.

J. Guo, Y. Li, X. Chen, H. Guo, L. Sun, C. Liu. "SCALE-UP: An Efficient Black-box Input-level Backdoor
Detection via Analyzing Scaled Prediction Consistency", ICLR 2023 (arXiv 2302.03251).

Every pixel value of the input is multiplied by each factor n of a scale set and clipped to [0, 1]. A
trigger keeps winning when the image is amplified, so a backdoor input keeps its label; a benign input
drifts to other labels. The scaled prediction consistency is

    SPC(x) = mean over n of 1[f(clip(n * x)) == f(x)],

higher meaning more suspicious. The scale set defaults to {3, 5, 7, 9, 11}, the setting of the
authors' BackdoorBox implementation of the paper's amplification up to 11 times.

Two variants, as in the paper:
- data-free (`per_class=False`): the score is SPC itself; `fit` only records clean statistics.
- data-limited (`per_class=True`, the default): `fit` computes the mean and standard deviation of SPC on
  clean inputs per class (grouped by the model's prediction, the label the score is standardised by),
  and the score is (SPC(x) - mean[c]) / std[c] with c = f(x). Classes seen fewer than `min_per_class`
  times among the clean inputs use the statistics pooled over all classes; standard deviations are
  floored at `min_std` so that a class whose clean SPC never varies does not divide by zero.

The detector runs its own forward passes on the scaled inputs (the method demands it) and never changes
the model. Inputs are expected in [0, 1] (normalisation lives inside malex models).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from malex.detectors.base import BACKDOOR, Detector
from malex.device import model_device
from malex.errors import ConfigError
from malex.models.inference import eval_mode
from malex.probe import Observation


@dataclass(frozen=True)
class ScaleUpConfig:
    """Pixel amplification factors, the data-limited switch and batching."""

    scales: tuple[float, ...] = (3.0, 5.0, 7.0, 9.0, 11.0)
    per_class: bool = True
    min_per_class: int = 2
    min_std: float = 0.05
    batch_size: int = 1024

    def __post_init__(self) -> None:
        scales = tuple(float(s) for s in self.scales)
        object.__setattr__(self, "scales", scales)
        if not scales or any(not np.isfinite(s) or s <= 1.0 for s in scales):
            raise ConfigError(f"invalid SCALE-UP scales {self.scales}; expected a non-empty list of factors > 1")
        if self.min_per_class < 2 or not self.min_std > 0.0 or self.batch_size < 1:
            raise ConfigError(
                f"invalid SCALE-UP settings {self}; expected min_per_class >= 2, min_std > 0 and batch_size >= 1"
            )


@torch.no_grad()
def scaled_consistency(
    model: nn.Module, x: torch.Tensor, scales: tuple[float, ...], pred: torch.Tensor | None = None,
    batch_size: int = 1024,
) -> torch.Tensor:
    """SPC of each input of `x`: the share of `scales` at which clip(n * x, 0, 1) keeps the label `pred`.

    `pred` defaults to the model's own labels of `x`. Returns float64 on the CPU, one value per input.
    """
    device = model_device(model)
    k = len(scales)
    factors = torch.tensor(scales, dtype=x.dtype, device=device).view(1, k, *([1] * (x.dim() - 1)))
    per_batch = max(1, batch_size // k)
    out = []
    with eval_mode(model):
        for start in range(0, x.shape[0], per_batch):
            xb = x[start : start + per_batch].to(device)
            labels = model(xb).argmax(dim=1) if pred is None else pred[start : start + per_batch].to(device)
            scaled = (xb.unsqueeze(1) * factors).clamp_(0.0, 1.0)  # (b, k, C, H, W)
            scaled_pred = model(scaled.flatten(0, 1)).argmax(dim=1).view(xb.shape[0], k)
            out.append((scaled_pred == labels.unsqueeze(1)).double().mean(dim=1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)


class ScaleUp(Detector):
    """SCALE-UP; data-limited (per-class standardised SPC) by default, data-free with `per_class=False`."""

    name = "scale_up"
    config_class = ScaleUpConfig
    evidence = BACKDOOR
    config: ScaleUpConfig
    fitted_attributes = ("spc_mean_", "spc_std_", "class_counts_")

    def spc(self, obs: Observation) -> np.ndarray:
        """Raw scaled prediction consistency of each input, in [0, 1] (labels from the probe pass)."""
        return scaled_consistency(self.model, obs.x, self.config.scales, obs.pred, self.config.batch_size).numpy()

    def fit(self, clean: Observation, y: torch.Tensor | None = None) -> "ScaleUp":
        """Mean and std of SPC on clean inputs, per predicted class (index = class) and pooled (last entry)."""
        n = len(clean)
        if n < 2:
            raise ConfigError(f"SCALE-UP needs at least 2 clean inputs to fit; got {n}")
        values = self.spc(clean)
        pred = clean.pred.numpy()
        num_classes = int(clean.logits.shape[1])
        mean = np.empty(num_classes + 1)
        std = np.empty(num_classes + 1)
        counts = np.bincount(pred, minlength=num_classes).astype(np.int64)
        mean[-1], std[-1] = values.mean(), max(values.std(ddof=1), self.config.min_std)
        for c in range(num_classes):
            v = values[pred == c]
            if v.size >= self.config.min_per_class:
                mean[c], std[c] = v.mean(), max(v.std(ddof=1), self.config.min_std)
            else:
                mean[c], std[c] = mean[-1], std[-1]
        self.spc_mean_ = mean
        self.spc_std_ = std
        self.class_counts_ = counts
        return self

    def score(self, obs: Observation) -> np.ndarray:
        """SPC (data-free) or SPC standardised by the predicted class's clean statistics (data-limited)."""
        self.check_fitted()
        values = self.spc(obs)
        if not self.config.per_class:
            return values.astype(np.float64)
        c = obs.pred.numpy()
        num_classes = self.spc_mean_.shape[0] - 1
        if c.size and c.max() >= num_classes:
            raise ConfigError(f"predicted class {int(c.max())} beyond the {num_classes} classes seen at fit")
        return ((values - self.spc_mean_[c]) / self.spc_std_[c]).astype(np.float64)

    def state(self) -> dict:
        out: dict = {"config": asdict(self.config)}
        if self.is_fitted:
            out["clean_spc_mean"] = float(self.spc_mean_[-1])
            out["clean_spc_std"] = float(self.spc_std_[-1])
        return out
