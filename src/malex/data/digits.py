"""The embedded default dataset: scikit-learn's bundled 8x8 handwritten digits (no download)."""

from __future__ import annotations

import torch

from malex.data.dataset import Dataset, Split, stratified_split


def load_digits(seed: int = 0, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)) -> Dataset:
    """The 1,797 digits as float32 (N, 1, 8, 8) in [0, 1], split train/val/test by `seed` (stratified)."""
    from sklearn.datasets import load_digits as sklearn_digits  # imported here: it costs ~1 s at start-up

    bunch = sklearn_digits()
    x = torch.from_numpy(bunch.images).float().div_(16.0).unsqueeze(1).contiguous()
    y = torch.from_numpy(bunch.target).long()
    train, val, test = stratified_split(y, fractions, seed)
    return Dataset(
        name="digits",
        train=Split(x[train], y[train]),
        val=Split(x[val], y[val]),
        test=Split(x[test], y[test]),
        num_classes=10,
        class_names=tuple(str(i) for i in range(10)),
    )
