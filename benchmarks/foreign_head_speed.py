"""What the default guard costs in front of models malex did not build, against their plain forward pass.

Run by hand from the repository root (not in CI):

    python benchmarks/foreign_head_speed.py --out benchmarks/results/foreign_head_speed.md

Two foreign MNIST architectures, defined here: `resgap`, a residual net with batch norm and GELU whose
global-average-pool features feed `head`, a single nn.Linear; and `sepfc`, depthwise-separable blocks with
group norm, SiLU and dropout, whose dense layer is named `fc`. Each is trained for `--epochs` on the MNIST
training split of ../shared/data (cached under cache/foreign/), the default guard is fitted on `--fit` clean
validation inputs, and `--n` clean test inputs are screened at batch 256 on one thread: the median over
`--repeats` of Guard.screen's time against the plain forward pass's, and the fit's wall time. The script uses
only APIs that earlier malex versions had, so the same command run against an earlier checkout
(PYTHONPATH=that/src) gives the before numbers.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from malex.data import load_dataset
from malex.guard import Guard, GuardConfig
from malex.models.inference import predict_logits
from malex.models.train import TrainConfig, train_classifier


class ResGAP(nn.Module):
    """Stem, two residual blocks (batch norm, GELU), global average pool, `head` = one dense layer."""

    def __init__(self, classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.GELU())
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.GELU(),
                          nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)) for _ in range(2))
        self.down = nn.MaxPool2d(2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = self.down(nn.functional.gelu(h + block(h)))
        return self.head(torch.flatten(self.pool(h), 1))


class SepFC(nn.Module):
    """Depthwise-separable blocks with group norm and SiLU, mean pool, dropout, one dense layer `fc`."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()

        def separable(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cin, 3, padding=1, groups=cin), nn.Conv2d(cin, cout, 1), nn.GroupNorm(4, cout),
                    nn.SiLU(), nn.MaxPool2d(2)]

        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.SiLU(),
                                      *separable(16, 32), *separable(32, 64))
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.features(x).mean((2, 3))))


NETS = {"resgap": ResGAP, "sepfc": SepFC}


def trained(name: str, data, epochs: int, cache: Path) -> nn.Module:
    """The net trained on MNIST's training split (seed 0), from the cache when it is there."""
    path = cache / f"{name}-e{epochs}.safetensors"
    torch.manual_seed(0)
    model = NETS[name]()
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    train_classifier(model, data.train, TrainConfig(epochs=epochs, seed=0), progress=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model.eval()


def median_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def median_ratio(run, baseline, repeats: int) -> float:
    """The median over `repeats` interleaved pairs of run's time over baseline's (a change of machine load hits
    both of a pair alike), after one warm-up call of each."""
    run(), baseline()
    ratios = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        t1 = time.perf_counter()
        baseline()
        ratios.append((t1 - t0) / (time.perf_counter() - t1))
    return float(np.median(ratios))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--fit", type=int, default=2000)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cache", type=Path, default=Path("cache/foreign"))
    p.add_argument("--out", type=Path, default=None, help="also write the table here (Markdown)")
    args = p.parse_args()
    data = load_dataset("mnist", seed=0)
    x_fit, y_fit = data.val.x[: args.fit], data.val.y[: args.fit]
    x = data.test.x[: args.n]
    import malex
    commit = subprocess.run(["git", "-C", str(Path(malex.__file__).parent), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    rows = []
    for name in args.nets:
        model = trained(name, data, args.epochs, args.cache)
        accuracy = float((predict_logits(model, data.test.x).argmax(1) == data.test.y).float().mean())
        torch.set_num_threads(2)
        t0 = time.perf_counter()
        guard = Guard(model, GuardConfig(progress=False)).fit(x_fit, y_fit)
        fit_s = time.perf_counter() - t0
        torch.set_num_threads(1)
        forward = median_seconds(lambda: predict_logits(model, x, batch_size=256), args.repeats)
        screen = median_seconds(lambda: guard.screen(x), args.repeats)
        layers = {k: d.layers() for k, d in guard.detectors.items()}
        rows.append((name, accuracy, fit_s, forward, screen, layers))
        print(f"{name}: accuracy {accuracy:.3f}, fit {fit_s:.1f} s, forward {forward * 1e3:.0f} ms, screen "
              f"{screen * 1e3:.0f} ms ({screen / forward:.1f}x), layers {layers}", flush=True)
    lines = [f"`{' '.join(shlex.quote(a) for a in ['python', *sys.argv])}` with malex at {commit or '?'} "
             f"({malex.__file__}); {args.n} MNIST test inputs at batch 256 on one thread, median of "
             f"{args.repeats}; guard fitted on {args.fit} validation inputs on two threads.", "",
             "| net | test accuracy | guard fit (s) | forward (ms) | guard screen (ms) | screen / forward | "
             "mutation reads |", "|---|---:|---:|---:|---:|---:|---|"]
    for name, accuracy, fit_s, forward, screen, layers in rows:
        lines.append(f"| {name} | {accuracy:.3f} | {fit_s:.1f} | {forward * 1e3:.0f} | {screen * 1e3:.0f} | "
                     f"{screen / forward:.1f}x | {layers['mutation_adv'] or 'the raw input (whole model)'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        with args.out.open("a") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
