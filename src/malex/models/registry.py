"""Architectures by name. Each builder returns a `Classifier` for a given input shape and class count."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from torch import nn

from malex.errors import ConfigError
from malex.models.classifier import Classifier, Normalize


def _conv_block(cin: int, cout: int, k: int, pad: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=pad), nn.ReLU()]


def _flat_size(features: nn.Sequential, shape: tuple[int, int, int]) -> int:
    import torch

    if any(s < 1 for s in shape):
        raise ConfigError(f"input shape {tuple(shape)}; expected positive (C, H, W)")
    try:
        with torch.no_grad():
            return int(features(torch.zeros(1, *shape)).numel())
    except RuntimeError as exc:
        raise ConfigError(f"images of shape {tuple(shape)} are too small or have the wrong channels for this "
                          f"architecture ({exc})") from exc


def _head(flat: int, hidden: int, num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(flat, hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


def _probe_names(features: nn.Sequential, prefix: str = "features") -> list[str]:
    """Default probe points: the output of every pooling layer, and of the last ReLU before the head."""
    names = [f"{prefix}.{i}" for i, m in enumerate(features) if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d))]
    last = len(features) - 1
    if f"{prefix}.{last}" not in names:
        names.append(f"{prefix}.{last}")
    return names


def _per_channel(values: Sequence[float], channels: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    raise ConfigError(f"{len(values)} normalisation constants for {channels} channels; expected 1 or {channels}")


def _assemble(
    features: nn.Sequential,
    shape: tuple[int, int, int],
    num_classes: int,
    hidden: int,
    dropout: float,
    mean: Sequence[float],
    std: Sequence[float],
) -> Classifier:
    head = _head(_flat_size(features, shape), hidden, num_classes, dropout)
    probe = _probe_names(features) + ["head.2", "head.4"]  # hidden dense activation, logits
    norm = Normalize(_per_channel(mean, shape[0]), _per_channel(std, shape[0]))
    return Classifier(norm, features, head, shape, num_classes, probe)


def digits_cnn(input_shape=(1, 8, 8), num_classes: int = 10, mean=(0.3,), std=(0.4,)) -> Classifier:
    """A small CNN for the 8x8 digits: conv3x3-32, conv3x3-64, pool, FC256."""
    c = input_shape[0]
    feats = nn.Sequential(*_conv_block(c, 32, 3, 1), *_conv_block(32, 64, 3, 1), nn.MaxPool2d(2))
    return _assemble(feats, tuple(input_shape), num_classes, 256, 0.25, mean, std)


def mnist_cnn(input_shape=(1, 28, 28), num_classes: int = 10, mean=(0.1307,), std=(0.3081,)) -> Classifier:
    """The study's MNIST CNN: conv5x5-16, pool, conv5x5-16, pool, FC512, FC-classes."""
    c = input_shape[0]
    feats = nn.Sequential(
        *_conv_block(c, 16, 5, 0), nn.MaxPool2d(2), *_conv_block(16, 16, 5, 0), nn.MaxPool2d(2)
    )
    return _assemble(feats, tuple(input_shape), num_classes, 512, 0.0, mean, std)


def gtsrb_vgg(
    input_shape=(3, 32, 32), num_classes: int = 43, mean=(0.34, 0.31, 0.32), std=(0.27, 0.26, 0.27)
) -> Classifier:
    """The study's GTSRB network: VGG-style conv 32-32-64-64-128-128 with pooling, FC512."""
    c = input_shape[0]
    layers: list[nn.Module] = []
    cin = c
    for width in (32, 64, 128):
        layers += _conv_block(cin, width, 3, 1) + _conv_block(width, width, 3, 1) + [nn.MaxPool2d(2)]
        cin = width
    feats = nn.Sequential(*layers)
    return _assemble(feats, tuple(input_shape), num_classes, 512, 0.5, mean, std)


@dataclass(frozen=True)
class Architecture:
    """A registered architecture: its builder and the input it was designed for."""

    name: str
    build: Callable[..., Classifier]
    description: str


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("digits_cnn", digits_cnn, "small CNN for 8x8 digits"),
        Architecture("mnist_cnn", mnist_cnn, "the study's MNIST CNN (LeNet-style, FC512)"),
        Architecture("gtsrb_vgg", gtsrb_vgg, "the study's GTSRB VGG-style CNN (FC512)"),
    )
}


def build_model(arch: str, input_shape: tuple[int, int, int], num_classes: int, **kwargs) -> Classifier:
    """Build architecture `arch` for images of `input_shape` (C, H, W) and `num_classes` classes."""
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")
    if num_classes < 2:
        raise ConfigError(f"num_classes is {num_classes}; expected at least 2")
    try:
        return ARCHITECTURES[arch].build(input_shape=tuple(int(s) for s in input_shape), num_classes=num_classes,
                                         **kwargs)
    except ConfigError as exc:
        raise ConfigError(f"architecture {arch!r}: {exc}") from exc
