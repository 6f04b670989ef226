"""Guard fit time and peak memory against the number of clean reference inputs.

Run by hand from the repository root (not in CI), on a model the study trained:

    python benchmarks/fit_scaling.py --model malex-out/study-mnist-gtsrb/models/mnist/seed0/clean.safetensors \
        --data mnist --sizes 1000 10000 50000

Each (guard, size) is fitted in a fresh subprocess, so that its peak resident memory is its own: the process
loads the model and the dataset, takes the first N inputs of the training split (with labels) as the clean
reference set, notes its resident memory, resets the peak (Linux `clear_refs`), fits the guard (`Guard.fit`:
the detectors on 60%, the calibration on 40%) and reports the wall time, the peak resident memory during the
fit (VmHWM) and how far above the memory held before the fit (model, data, reference inputs) it went. Prints a table
and writes it as Markdown with the command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from malex.report.aggregate import markdown_table
from malex.report.table import print_table, rows_table

GUARDS = {"default": None, "activation": ("nic", "mahalanobis", "lid", "kd_bu")}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="a model file written by malex (safetensors)")
    p.add_argument("--data", default="mnist", help="dataset name or path (its training split is the reference)")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    p.add_argument("--guards", nargs="+", default=list(GUARDS), choices=list(GUARDS))
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", type=Path, default=None,
                   help="Markdown file (default benchmarks/results/fit_scaling_<data>.md)")
    p.add_argument("--worker", nargs=2, metavar=("GUARD", "SIZE"), help=argparse.SUPPRESS)
    return p.parse_args()


def _status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> None:
    """Start a new peak-resident-memory window (Linux: writing 5 to clear_refs resets VmHWM)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(args: argparse.Namespace) -> None:
    """Fit one guard on the first SIZE training inputs; print a JSON line with time and memory."""
    import torch

    from malex.data import load_dataset
    from malex.guard import Guard, GuardConfig
    from malex.models import load_model

    torch.set_num_threads(args.threads)
    name, size = args.worker[0], int(args.worker[1])
    model, _ = load_model(args.model)
    data = load_dataset(args.data, 0)
    if size > len(data.train):
        raise SystemExit(f"{args.data} has {len(data.train)} training inputs; asked for {size}")
    x, y = data.train.x[:size].clone(), data.train.y[:size].clone()
    del data
    config = GuardConfig(progress=False) if GUARDS[name] is None else GuardConfig(detectors=GUARDS[name],
                                                                                     progress=False)
    guard = Guard(model, config)
    reset_peak()
    before = _status_mib("VmRSS")
    start = time.perf_counter()
    guard.fit(x, y)
    seconds = time.perf_counter() - start
    print(json.dumps({"guard": name, "size": size, "seconds": seconds, "rss_before": before,
                      "peak": _status_mib("VmHWM"), "inputs_mib": x.numel() * 4 / 2**20,
                      "detectors": list(config.detectors)}))


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    rows = []
    for name in args.guards:
        for size in args.sizes:
            cmd = [sys.executable, __file__, "--model", str(args.model), "--data", args.data, "--threads",
                   str(args.threads), "--worker", name, str(size)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"{name} at {size}: {done.stderr.strip()}")
            r = json.loads(done.stdout.strip().splitlines()[-1])
            r["growth"] = r["peak"] - r["rss_before"]
            rows.append(r)
            print(f"{name} guard, {size} inputs: {r['seconds']:.1f} s, peak {r['peak']:.0f} MiB "
                  f"({r['growth']:.0f} MiB above the {r['rss_before']:.0f} MiB held before the fit)", flush=True)
    headers = ["guard", "reference inputs", "fit s", "peak RSS MiB", "held before fit MiB",
               "peak above that MiB", "reference inputs MiB"]
    body = [[r["guard"], f"{r['size']:,}", f"{r['seconds']:.1f}", f"{r['peak']:.0f}", f"{r['rss_before']:.0f}",
             f"{r['growth']:.0f}", f"{r['inputs_mib']:.0f}"] for r in rows]
    print_table(rows_table(f"guard fit time and peak memory: {args.data}", headers, body))
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    out = args.out or Path("benchmarks/results") / f"fit_scaling_{Path(str(args.data)).stem}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# Guard fit time and peak memory against reference size: {args.data}", "", "```",
             "python benchmarks/" + Path(__file__).name + " " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
             "```", "",
             f"- model {args.model}; reference = the first N training inputs with labels; each fit in its own process",
             "- 'peak RSS' = peak resident memory during the fit (VmHWM, reset just before it); 'peak above that' = "
             "it minus the resident memory just before the fit (model, data and the reference inputs loaded)",
             "- detectors: " + "; ".join(f"{r['guard']}: {', '.join(r['detectors'])}" for r in rows[:: len(args.sizes)]),
             f"- Python {platform.python_version()}, {args.threads} torch thread(s), {os.cpu_count()} CPU cores, "
             f"load average at the end {load}; run {dt.datetime.now():%Y-%m-%d %H:%M}", "",
             markdown_table(headers, body)]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
