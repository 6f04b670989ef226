"""Train the CIFAR-10 model of the study bench and report its clean test accuracy and training time.

The recipe: `cifar_resnet` trained on the shared CIFAR-10 subset's training split (11,520 of its 12,800
images; 1,280 stay out as the validation split that guards fit and calibrate on) with Adam (lr 2e-3,
weight decay 1e-4) and cosine decay, batches of 128, random translation by up to 4 pixels and horizontal
flips. The trained model is
cached under cache/ (git-ignored) and loaded from there on the next run with the same settings.

    python benchmarks/train_cifar.py                       # the full recipe, 30 epochs (under an hour on 2 cores)
    python benchmarks/train_cifar.py --epochs 4 --no-cache # a short run: does it learn? (61.8% test accuracy)
    python benchmarks/train_cifar.py --epochs 1 --limit 2560 --no-cache   # time one epoch on a part
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path

# OpenMP threads that sleep at barriers instead of spinning: on a machine shared with other jobs this
# halved the wall time of a training step (2 threads, 4x oversubscribed); set before torch loads OpenMP
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from malex.attacks.backdoor import train_model
from malex.data import load_dataset
from malex.models import load_model, save_model
from malex.models.inference import accuracy
from malex.models.train import TrainConfig

#: epochs of the full recipe: measured 106 s per epoch on 2 threads of a CPU shared with other jobs (load
#: about 7 on 2 cores; 52 CPU-seconds per epoch), so about 55 minutes there and well under half that alone
EPOCHS = 30


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="cifar10", help="dataset name or path (default: cifar10)")
    p.add_argument("--arch", default="cifar_resnet", help="architecture (default: cifar_resnet)")
    p.add_argument("--epochs", type=int, default=EPOCHS, help=f"training epochs (default: {EPOCHS})")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--shift", type=int, default=4, help="random translation in pixels (0: none)")
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    p.add_argument("--limit", type=int, default=None, help="train on only the first N training images")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=Path("cache"), help="folder for the trained model")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cached model")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(args.data, seed=args.seed)
    train = data.train if args.limit is None else data.train.subset(slice(0, args.limit))
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                         shift=args.shift, flip=not args.no_flip, seed=args.seed)
    tag = (f"{data.name}_{args.arch}_seed{args.seed}_e{args.epochs}_b{config.batch_size}_lr{config.lr:g}"
           f"_wd{config.weight_decay:g}_s{config.shift}{'_flip' if config.flip else ''}"
           + (f"_n{args.limit}" if args.limit else ""))
    path = args.cache / f"{tag}.safetensors"
    if not args.no_cache and path.is_file():
        model, desc = load_model(path)
        result = dict(desc["info"], source=f"loaded from {path}")
        result["clean_accuracy"] = round(accuracy(model, data.test.x, data.test.y), 4)  # re-measured
    else:
        trained = train_model(replace(data, train=train), args.arch, config, progress=not args.quiet)
        model, seconds, cpu_seconds = trained.model, trained.seconds, trained.cpu_seconds
        result = {
            "dataset": data.name, "arch": args.arch, "train_images": len(train), "epochs": args.epochs,
            "batch_size": config.batch_size, "lr": config.lr, "weight_decay": config.weight_decay,
            "shift": config.shift, "flip": config.flip, "seed": args.seed, "threads": args.threads,
            "train_seconds": round(seconds, 1), "seconds_per_epoch": round(seconds / args.epochs, 1),
            # CPU time over all threads: the wall time the run would take alone on `threads` free cores is
            # about this divided by `threads`; the gap to train_seconds is what sharing the machine cost
            "cpu_seconds_per_epoch": round(cpu_seconds / args.epochs, 1),
        }
        result["train_accuracy"] = round(accuracy(model, train.x, train.y), 4)
        result["val_accuracy"] = round(accuracy(model, data.val.x, data.val.y), 4)
        result["clean_accuracy"] = round(trained.clean_accuracy, 4)
        if not args.no_cache:
            save_model(model, path, args.arch, info=result)
            result["source"] = f"trained, cached at {path}"
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
