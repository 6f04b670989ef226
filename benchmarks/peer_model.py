"""The BadNets-poisoned digits model that the peer comparisons share, cached under cache/."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from malex.attacks.backdoor import PoisonConfig, make_trigger, train_model
from malex.data import Dataset
from malex.models import Classifier, load_model, save_model
from malex.models.train import TrainConfig

ARCH = "digits_cnn"


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The settings of the shared poisoned model."""
    p.add_argument("--seed", type=int, default=0, help="data split, poisoning and training seed")
    p.add_argument("--epochs", type=int, default=20, help="training epochs when the model is not cached")
    p.add_argument("--rate", type=float, default=0.1, help="poisoning rate")
    p.add_argument("--target", type=int, default=1, help="backdoor target class")
    p.add_argument("--trigger-size", type=int, default=2, help="BadNets square side (margin 0)")
    p.add_argument("--cache", type=Path, default=Path("cache"), help="folder for the trained model")


def poisoned_model(data: Dataset, args: argparse.Namespace) -> tuple[Classifier, str]:
    """The BadNets-poisoned digits_cnn from the cache, or trained and cached; and where it came from."""
    path = args.cache / (f"peer_{ARCH}_badnets{args.trigger_size}_t{args.target}_r{args.rate}"
                         f"_seed{args.seed}_e{args.epochs}.safetensors")
    if path.is_file():
        model, _ = load_model(path)
        return model, f"loaded from {path}"
    trigger = make_trigger("badnets", size=args.trigger_size, margin=0)
    model = train_model(data, ARCH, TrainConfig(epochs=args.epochs, seed=args.seed), trigger,
                        PoisonConfig(args.rate, args.target, args.seed), progress=False).model
    save_model(model, path, ARCH, info={"dataset": "digits", "seed": args.seed, "epochs": args.epochs,
                                        "trigger": trigger.describe(), "rate": args.rate, "target": args.target})
    return model, f"trained ({args.epochs} epochs, torch {torch.__version__}) and saved to {path}"
