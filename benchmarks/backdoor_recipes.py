"""Recipes that make a backdoor learnt: attack success rate (ASR) and clean accuracy per recipe and seed.

Each model is trained exactly as the study trains its models (configs/mnist_gtsrb.toml: the dataset's
training settings, the seed's train/validation split, the seed's initial weights and poisoned inputs),
changing one thing per recipe:

* `scratch`: the study's recipe, a poisoned model trained from scratch, at a poisoning rate and a number of
  epochs of its own;
* `finetune`: the supplier's threat model: the seed's CLEAN model (trained as the study trains it, cached under
  cache/) is trained further on the poisoned training split for a few epochs at a given learning rate.

    python benchmarks/backdoor_recipes.py --attack adaptive_blend --recipe finetune:0.01:2:0.001 --seeds 0 1 2
    python benchmarks/backdoor_recipes.py --attack adaptive_blend --recipe scratch:0.03:5 --seeds 0

A recipe is KIND:RATE:EPOCHS[:LR] (LR: the fine-tuning learning rate; default the dataset's). Rows are
appended to the output Markdown file, one per (recipe, seed), with the clean model's accuracy beside them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from malex.attacks.backdoor import PoisonConfig, fine_tune_model, make_trigger, train_model
from malex.data import load_dataset
from malex.errors import ConfigError
from malex.evaluate.study import load_config
from malex.models import load_model, save_model
from malex.models.inference import accuracy
from malex.models.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def parse_recipe(text: str) -> tuple[str, float, int, float | None]:
    """KIND:RATE:EPOCHS[:LR] -> (kind, rate, epochs, lr or None)."""
    parts = text.split(":")
    if len(parts) not in (3, 4) or parts[0] not in ("scratch", "finetune"):
        raise ConfigError(f"recipe {text!r}; expected scratch|finetune:RATE:EPOCHS[:LR]")
    return parts[0], float(parts[1]), int(parts[2]), float(parts[3]) if len(parts) == 4 else None


def clean_model(data, arch: str, train: TrainConfig, cache: Path) -> tuple[torch.nn.Module, float]:
    """The seed's clean model as the study trains it (cached by its settings); (model, clean test accuracy)."""
    path = cache / f"recipes-{data.name}-{arch}-e{train.epochs}-b{train.batch_size}-s{train.shift}-seed{train.seed}.pt"
    if path.is_file():
        model, _ = load_model(path)
    else:
        model = train_model(data, arch, train, progress=False).model
        save_model(model, path, arch, {"dataset": data.name})
    return model.eval(), accuracy(model, data.test.x, data.test.y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "mnist_gtsrb.toml")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--attack", default="adaptive_blend", help="a backdoor of the config")
    parser.add_argument("--recipe", required=True, help="KIND:RATE:EPOCHS[:LR]")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=ROOT / "cache")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "backdoor_recipes_mnist.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kind, rate, epochs, lr = parse_recipe(args.recipe)
    config = load_config(args.config)
    ds = config.dataset(args.dataset)
    backdoor = ds.attack(args.attack)
    trigger = make_trigger(backdoor.method, **backdoor.settings)
    args.cache.mkdir(parents=True, exist_ok=True)
    if not args.out.exists():
        args.out.write_text(
            "# Backdoor recipes: ASR and clean accuracy per recipe and seed\n\n"
            "Written by benchmarks/backdoor_recipes.py (see its docstring). `finetune`: the seed's clean model "
            "trained further on the poisoned training split; `scratch`: trained from scratch on it.\n\n"
            "| dataset | attack | recipe | seed | clean acc | clean model acc | drop | ASR | train s |\n"
            "|---|---|---|---:|---:|---:|---:|---:|---:|\n")
    for seed in args.seeds:
        data = load_dataset(ds.data, seed=seed, data_dir=config.data_dir)
        base = TrainConfig(**ds.train, seed=seed)
        poison = PoisonConfig(rate, ds.target, seed)
        clean, clean_acc = clean_model(data, ds.arch, base, args.cache)
        if kind == "scratch":
            trained = train_model(data, ds.arch, TrainConfig(**{**ds.train, "epochs": epochs}, seed=seed), trigger,
                                  poison, progress=False)
        else:
            tune = TrainConfig(**{**ds.train, "epochs": epochs, **({} if lr is None else {"lr": lr})}, seed=seed)
            trained = fine_tune_model(clean, ds.arch, data, tune, trigger, poison, progress=False)
        acc, asr = trained.clean_accuracy, trained.attack_success_rate
        row = (f"| {args.dataset} | {args.attack} | {args.recipe} | {seed} | {acc:.4f} | {clean_acc:.4f} | "
               f"{clean_acc - acc:+.4f} | {asr:.4f} | {trained.seconds:.0f} |\n")
        print(row, end="", flush=True)
        with args.out.open("a") as handle:
            handle.write(row)


if __name__ == "__main__":
    main()
