"""Screening throughput of each detector and of whole guards against the plain model's forward pass.

Run by hand from the repository root (not in CI), on a model the study trained, e.g.

    python benchmarks/guard_speed.py --model malex-out/study-mnist-gtsrb/models/mnist/seed0/clean.safetensors \
        --data mnist --batch-sizes 1 256

For one model: a guard holding every detector is fitted once on clean validation inputs (`--fit`), and so
is each guard of `--guards` (the shipped default guard and the activation/feature-space guard NIC +
Mahalanobis + LID + KD+BU of issue 6). Then, per batch size, the same clean test inputs are

- run through the plain model (`predict_logits`, no hooks): the floor;
- screened by each detector alone: a probe pass capturing that detector's layers, then its `score`;
- screened by each guard: `Guard.screen` (one probe pass for all its detectors, every score, p-values,
  verdicts).

Each measurement is repeated (`--repeats`, the measurements of one repeat interleaved so that a change
in machine load hits all of them alike) and the median is kept. Reports inputs/s and the overhead ratio
(time / plain forward time) at each batch size, prints a table and writes it as Markdown with the command
and the machine's load.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from rich.console import Console

from malex.data import load_dataset
from malex.detectors import DETECTORS
from malex.report.aggregate import markdown_table
from malex.guard import Guard, GuardConfig
from malex.models import load_model
from malex.models.inference import predict_logits
from malex.probe import Probe
from malex.report.table import print_table, rows_table

ACTIVATION_GUARD = ("nic", "mahalanobis", "lid", "kd_bu")
GUARDS = {"default": GuardConfig().detectors, "activation": ACTIVATION_GUARD}
FLOORS = ("msp", "mahalanobis_penultimate")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="a model file written by malex (safetensors)")
    p.add_argument("--data", default="mnist", help="dataset name or path (its validation and test splits)")
    p.add_argument("--seed", type=int, default=0, help="dataset split seed (use the model's)")
    p.add_argument("--fit", type=int, default=2000, help="clean validation inputs the guards are fitted on")
    p.add_argument("--n", type=int, default=1024, help="clean test inputs screened per measurement at batch > 1")
    p.add_argument("--n-single", type=int, default=64, help="inputs screened one by one at batch 1")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256])
    p.add_argument("--detectors", nargs="+", default=[d for d in DETECTORS if d != "mutation_bd_fixed"],
                   help="detectors timed alone")
    p.add_argument("--guards", nargs="+", default=list(GUARDS), choices=list(GUARDS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", type=Path, default=None,
                   help="Markdown file (default benchmarks/results/guard_speed_<data>.md)")
    return p.parse_args()


def timed(run: Callable[[torch.Tensor], object], x: torch.Tensor, batch: int) -> float:
    """Seconds to push `x` through `run` in batches of `batch`."""
    start = time.perf_counter()
    for i in range(0, len(x), batch):
        run(x[i : i + batch])
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    console = Console(stderr=True)
    model, meta = load_model(args.model)
    data = load_dataset(args.data, args.seed)
    fit_x, fit_y = data.val.x[: args.fit], data.val.y[: args.fit]
    test_x = data.test.x
    quiet = dict(progress=False)

    console.print(f"fitting a guard with every timed detector on {len(fit_x)} clean inputs ...")
    t0 = time.perf_counter()
    every = Guard(model, GuardConfig(detectors=tuple(args.detectors), **quiet)).fit(fit_x, fit_y)
    console.print(f"  {time.perf_counter() - t0:.0f} s")
    guards = {}
    for name in args.guards:
        t0 = time.perf_counter()
        guards[name] = Guard(model, GuardConfig(detectors=GUARDS[name], **quiet)).fit(fit_x, fit_y)
        console.print(f"fitted the {name} guard ({', '.join(GUARDS[name])}) in {time.perf_counter() - t0:.0f} s")

    runs: dict[str, Callable[[torch.Tensor], object]] = {
        "plain forward pass": lambda xb: predict_logits(model, xb, batch_size=len(xb)),
    }
    for name, det in every.detectors.items():
        probe = Probe(model, det.layers())
        runs[name] = lambda xb, det=det, probe=probe: det.score(probe.run(xb, batch_size=len(xb)))
    for name, guard in guards.items():
        runs[f"guard: {name}"] = guard.screen

    seconds: dict[tuple[str, int], list[float]] = {}
    for batch in args.batch_sizes:
        x = test_x[: args.n_single if batch == 1 else args.n]
        for run in runs.values():  # warm-up (lazy caches, first-call costs)
            run(x[:batch])
        for r in range(args.repeats):
            for name, run in runs.items():
                seconds.setdefault((name, batch), []).append(timed(run, x, batch))
            console.print(f"batch {batch}: repeat {r + 1}/{args.repeats} done")

    headers = ["screened by"]
    for b in args.batch_sizes:
        headers += [f"inputs/s @{b}", f"x forward @{b}"]
    rows = []
    for name in runs:
        row = [name]
        for b in args.batch_sizes:
            n = args.n_single if b == 1 else args.n
            med = float(np.median(seconds[(name, b)]))
            floor = float(np.median(seconds[("plain forward pass", b)]))
            row += [f"{n / med:,.0f}", f"{med / floor:.2f}"]
        rows.append(row)

    title = f"screening throughput on {meta.get('arch', '?')} ({args.data}), {args.threads} torch thread(s)"
    print_table(rows_table(title, headers, rows))

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    out = args.out or Path("benchmarks/results") / f"guard_speed_{Path(str(args.data)).stem}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# Screening throughput: {meta.get('arch', '?')} on {args.data}",
        "",
        "```",
        "python benchmarks/" + Path(__file__).name + " " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "```",
        "",
        f"- model {args.model}; guards fitted on {len(fit_x)} clean validation inputs; {args.n} clean test inputs "
        f"per measurement at batch > 1, {args.n_single} at batch 1; median of {args.repeats} interleaved repeats",
        "- 'x forward' = time / the plain forward pass's time on the same inputs at the same batch size; a "
        "detector alone includes its own probe pass",
        f"- Python {platform.python_version()}, torch {torch.__version__}, {args.threads} torch thread(s), "
        f"{os.cpu_count()} CPU cores, load average at the end {load}; run {dt.datetime.now():%Y-%m-%d %H:%M}",
        "",
        markdown_table(headers, rows),
    ]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
