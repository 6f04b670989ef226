"""malex's CW-L2 against ART's CarliniL2Method on a small digits CNN, untargeted and targeted.

Run by hand from the repository root (needs the `bench` extra, i.e. adversarial-robustness-toolbox):

    python benchmarks/cw_vs_art.py --n 200 --seed 0

Both attacks get the same model, inputs, targets and settings (confidence 0, iterations per binary-search
step, binary-search steps, learning rate, initial constant) and are scored the same way: an input counts
as broken when the model's prediction on the returned image is wrong (untargeted) or equals the target
(targeted), and L2 is measured between the returned image and the clean one. The table is printed and
written as Markdown (default benchmarks/results/cw_vs_art.md); a `## Discussion` section already in that
file is kept, so hand-written notes survive a re-run. The trained model is cached under `cache/`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from malex.attacks.adversarial import CW, CWConfig
from malex.data import Dataset, load_digits
from malex.models import Classifier, build_model, load_model, save_model

ARCH = "digits_cnn"
DISCUSSION = "## Discussion"


@dataclass(frozen=True)
class Row:
    """One attack run, scored by the model's predictions on the returned images."""

    mode: str
    impl: str
    success: torch.Tensor  # bool per input
    l2: torch.Tensor  # per input, returned image vs clean
    seconds: float

    @property
    def success_rate(self) -> float:
        return float(self.success.float().mean())

    def mean_l2(self, mask: torch.Tensor | None = None) -> float:
        """Mean L2 over successful inputs, or over `mask` when given."""
        keep = self.success if mask is None else mask
        return float(self.l2[keep].mean()) if bool(keep.any()) else float("nan")

    def median_l2(self) -> float:
        return float(self.l2[self.success].median()) if bool(self.success.any()) else float("nan")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="correctly classified test digits to attack")
    p.add_argument("--seed", type=int, default=0, help="seed for training, the input sample and the targets")
    p.add_argument("--steps", type=int, default=100, help="iterations per binary-search step (ART max_iter)")
    p.add_argument("--binary-search-steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.01, help="learning rate (malex: Adam; ART: initial line-search step)")
    p.add_argument("--c", type=float, default=1.0, help="initial constant c (ART initial_const)")
    p.add_argument("--batch-size", type=int, default=200, help="inputs per batch, both implementations")
    p.add_argument("--epochs", type=int, default=8, help="training epochs when the model is not cached")
    p.add_argument("--cache", type=Path, default=Path("cache"), help="folder for the trained model")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/cw_vs_art.md"))
    p.add_argument("--also-lr", type=float, default=None,
                   help="also run malex at this learning rate (a reference row, not matched with ART)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p.parse_args(argv)


def train_digits_model(data: Dataset, seed: int, epochs: int) -> Classifier:
    """A digits_cnn trained with Adam on the training split."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_model(ARCH, data.image_shape, data.num_classes)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.train), generator=gen)
        for lo in range(0, len(order), 64):
            idx = order[lo:lo + 64]
            loss = F.cross_entropy(model(data.train.x[idx]), data.train.y[idx])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    optimiser.zero_grad(set_to_none=True)
    return model.eval()


def cached_model(data: Dataset, cache: Path, seed: int, epochs: int) -> tuple[Classifier, str]:
    """Load the model from `cache`, or train and store it there; also says which happened."""
    path = cache / f"cw_vs_art_{ARCH}_seed{seed}_e{epochs}.safetensors"
    if path.is_file():
        model, _ = load_model(path)
        return model, f"loaded from {path}"
    model = train_digits_model(data, seed, epochs)
    save_model(model, path, ARCH, info={"dataset": "digits", "seed": seed, "epochs": epochs})
    return model, f"trained ({epochs} epochs) and saved to {path}"


def pick_inputs(model: Classifier, data: Dataset, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """`n` correctly classified test digits in a seeded random order, and the model's test accuracy."""
    with torch.no_grad():
        pred = model(data.test.x).argmax(1)
    right = torch.nonzero(pred == data.test.y).flatten()
    order = right[torch.randperm(len(right), generator=torch.Generator().manual_seed(seed))][:n]
    accuracy = float((pred == data.test.y).float().mean())
    return data.test.x[order], data.test.y[order], accuracy


def random_targets(y: torch.Tensor, num_classes: int, seed: int) -> torch.Tensor:
    """A uniformly random class other than the true one, per input."""
    shift = torch.randint(1, num_classes, y.shape, generator=torch.Generator().manual_seed(seed + 1))
    return (y + shift) % num_classes


def score(model: Classifier, mode: str, impl: str, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
          target: torch.Tensor | None, seconds: float) -> Row:
    """Success and L2 of returned images `x_adv`, judged by the model alone."""
    with torch.no_grad():
        pred = model(x_adv).argmax(1)
    success = pred != y if target is None else pred == target
    return Row(mode, impl, success, (x_adv - x).flatten(1).norm(dim=1), seconds)


def run_malex(model: Classifier, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
              args: argparse.Namespace, lr: float | None = None) -> tuple[torch.Tensor, float]:
    """malex CW-L2 with the benchmark's settings (learning rate `lr` instead of --lr when given)."""
    config = CWConfig(confidence=0.0, c=args.c, steps=args.steps, lr=args.lr if lr is None else lr,
                      binary_search_steps=args.binary_search_steps, abort_early=True)
    result = CW(config).run(model, x, y, target=target, batch_size=args.batch_size, progress=not args.no_progress)
    return result.x_adv, result.seconds


def run_art(model: Classifier, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
            args: argparse.Namespace) -> tuple[torch.Tensor, float]:
    """ART's CarliniL2Method with the benchmark's settings (its line-search limits left at their defaults)."""
    from art.attacks.evasion import CarliniL2Method
    from art.estimators.classification import PyTorchClassifier

    classifier = PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                                   nb_classes=model.num_classes, clip_values=(0.0, 1.0), device_type="cpu")
    attack = CarliniL2Method(classifier, confidence=0.0, targeted=target is not None, learning_rate=args.lr,
                             binary_search_steps=args.binary_search_steps, max_iter=args.steps,
                             initial_const=args.c, batch_size=args.batch_size, verbose=not args.no_progress)
    labels = (y if target is None else target).numpy()
    start = time.perf_counter()
    x_adv = attack.generate(x.numpy().astype(np.float32), y=labels)
    seconds = time.perf_counter() - start
    return torch.from_numpy(np.asarray(x_adv, dtype=np.float32)), seconds


def comparisons(rows: list[Row]) -> list[str]:
    """Sentences comparing each malex row with ART in the same mode, computed from the rows."""
    lines = []
    for ours in (r for r in rows if r.impl != "ART"):
        art = partner(rows, ours)
        both = ours.success & art.success
        ratio = ours.mean_l2(both) / art.mean_l2(both) if bool(both.any()) else float("nan")
        lines.append(
            f"- {ours.mode}, {ours.impl}: success {ours.success_rate:.1%} vs ART {art.success_rate:.1%} "
            f"({100 * (ours.success_rate - art.success_rate):+.1f} points); on the {int(both.sum())} inputs both broke, "
            f"mean L2 {ours.mean_l2(both):.3f} vs ART {art.mean_l2(both):.3f} (ratio {ratio:.2f}); "
            f"wall time {ours.seconds:.1f} s vs {art.seconds:.1f} s (ART takes {art.seconds / ours.seconds:.1f}x as long)."
        )
    return lines


def warm_up(model: Classifier, x: torch.Tensor) -> None:
    """One forward and backward pass, so one-off start-up costs do not land in the first timing."""
    x = x.clone().requires_grad_(True)
    torch.autograd.grad(model(x).sum(), [x])


def partner(rows: list[Row], row: Row) -> Row:
    """The row `row` is compared with: ART for a malex row, the matched malex row for ART."""
    impl = "malex" if row.impl == "ART" else "ART"
    return next(r for r in rows if r.mode == row.mode and r.impl == impl)


def paired_l2(rows: list[Row], row: Row) -> float:
    """Mean L2 of `row` over the inputs that it and its partner row both broke."""
    return row.mean_l2(row.success & partner(rows, row).success)


HEADERS = ["mode", "implementation", "success rate", "mean L2 (successful)", "median L2 (successful)",
           "mean L2 (both broke)", "wall time (s)"]
# "both broke": the inputs that this row and its partner (ART for malex rows, matched malex for ART) broke


def cells(rows: list[Row], row: Row) -> list[str]:
    """One table row as text."""
    return [row.mode, row.impl, f"{row.success_rate:.1%}", f"{row.mean_l2():.3f}", f"{row.median_l2():.3f}",
            f"{paired_l2(rows, row):.3f}", f"{row.seconds:.1f}"]


def print_table(rows: list[Row], console: Console) -> None:
    """The results as a rich table on the console."""
    table = Table(title="CW-L2: malex vs ART")
    for i, header in enumerate(HEADERS):
        table.add_column(header, justify="left" if i < 2 else "right")
    for row in rows:
        table.add_row(*cells(rows, row))
    console.print(table)


def markdown(rows: list[Row], args: argparse.Namespace, command: str, setup: list[str], keep: str) -> str:
    """The Markdown report: command, setup, table, computed comparisons, then any kept discussion."""
    out = ["# CW-L2: malex vs ART (CarliniL2Method)", "", "Command (from the repository root):", "", "```",
           command, "```", "", "## Setup", "", *[f"- {line}" for line in setup], "", "## Results", "",
           "| " + " | ".join(HEADERS) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(HEADERS) - 2)) + "|"]
    out += ["| " + " | ".join(cells(rows, row)) + " |" for row in rows]
    out += ["", "Computed from the table:", "", *comparisons(rows), ""]
    if keep:
        out += [keep.rstrip(), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, print the table and write the Markdown file."""
    args = parse_args(argv)
    console = Console()
    data = load_digits(args.seed)
    model, origin = cached_model(data, args.cache, args.seed, args.epochs)
    x, y, accuracy = pick_inputs(model, data, args.n, args.seed)
    targets = random_targets(y, data.num_classes, args.seed)

    warm_up(model, x[:args.batch_size])
    rows: list[Row] = []
    for mode, target in (("untargeted", None), ("targeted", targets)):
        runs = [("malex", run_malex), ("ART", run_art)]
        if args.also_lr is not None:
            runs.append((f"malex, lr {args.also_lr}", partial(run_malex, lr=args.also_lr)))
        for impl, run in runs:
            console.print(f"[bold]{mode} {impl}[/bold] on {len(y)} digits ...")
            x_adv, seconds = run(model, x, y, target, args)
            rows.append(score(model, mode, impl, x, x_adv, y, target, seconds))

    import art

    command = shlex.join(["python", "benchmarks/cw_vs_art.py", *(sys.argv[1:] if argv is None else argv)])
    setup = [
        f"model: {ARCH} on the embedded 8x8 digits (split seed {args.seed}), {origin}; test accuracy {accuracy:.1%}",
        f"inputs: {len(y)} correctly classified test digits (seeded sample); targets: a random other class each",
        f"settings (both): confidence 0, {args.steps} iterations per binary-search step, "
        f"{args.binary_search_steps} binary-search steps, learning rate {args.lr}, initial c {args.c}, "
        f"batch size {args.batch_size}; malex abort_early on; ART max_halving/max_doubling at defaults (5/5)"
        + (f"; the row 'malex, lr {args.also_lr}' changes only malex's learning rate (a reference, not matched)"
           if args.also_lr is not None else ""),
        "'mean L2 (both broke)': over the inputs this row and its partner broke (ART for a malex row, the matched "
        "malex row for ART)",
        "scoring (both): broken = the model's prediction on the returned image is wrong (untargeted) or the target "
        "(targeted); L2 between returned and clean image in [0, 1] pixel units (8x8 = 64 pixels)",
        f"environment: Python {platform.python_version()}, torch {torch.__version__}, ART {art.__version__}, "
        f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, CPU only; "
        f"run {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}",
    ]
    print_table(rows, console)
    for line in comparisons(rows):
        console.print(line)

    keep = ""
    if args.out.is_file():
        old = args.out.read_text()
        if DISCUSSION in old:
            keep = old[old.index(DISCUSSION):]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, args, command, setup, keep))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
