"""The clean MNIST model of benchmarks/adaptive_attacks.py: the study's mnist_cnn and recipe
(configs/mnist_gtsrb.toml: 5 epochs, batch 128, 2-pixel shifts), trained by malex's `train_model` once per seed
and cached as a malex model file.

    python benchmarks/adaptive_model.py --seed 0   # trains (or finds) malex-out/adaptive/mnist_cnn-seed0.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from malex.attacks.backdoor import train_model
from malex.data import load_dataset
from malex.data.dataset import Dataset
from malex.models.io import load_model, save_model
from malex.models.train import TrainConfig

CACHE = Path("malex-out/adaptive")


def recipe(seed: int) -> TrainConfig:
    """The study's MNIST training settings (configs/mnist_gtsrb.toml) with the seed."""
    return TrainConfig(epochs=5, batch_size=128, shift=2, seed=seed)


def cached_model(data: Dataset, seed: int, cache: Path = CACHE) -> tuple[nn.Module, float]:
    """(model in eval mode, clean test accuracy): read from `cache`, else trained with `recipe(seed)` and written
    there."""
    path = cache / f"mnist_cnn-seed{seed}.safetensors"
    if path.is_file():
        model, desc = load_model(path)
        return model, float(desc["info"]["clean_accuracy"])
    trained = train_model(data, "mnist_cnn", recipe(seed), progress=True)
    cache.mkdir(parents=True, exist_ok=True)
    save_model(trained.model, path, "mnist_cnn", {"clean_accuracy": trained.clean_accuracy, "seed": seed})
    print(f"seed {seed}: trained in {trained.seconds:.0f} s, clean test accuracy {trained.clean_accuracy:.4f}",
          flush=True)
    return trained.model.eval(), trained.clean_accuracy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    cached_model(load_dataset("mnist", seed=args.seed), args.seed)


if __name__ == "__main__":
    main()
