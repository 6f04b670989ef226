"""A study grid through Ray against the local run: wall time, identical tables, per-task times, and a model of the
grid's wall time on more workers (issue 18).

Run by hand from the repository root (not in CI; needs the ray extra):

    python benchmarks/study_ray.py

1. `configs/digits.toml` (3 seeds, 2 backdoors, 3 adversarial attacks, 12 detectors) runs locally into one
   fresh folder and through Ray (a private instance of `--workers` CPUs, one task per model of each dataset
   and seed, one torch thread each) into another, each in its own process; the wall times, and whether
   results.csv, summary.csv and results.md are byte for byte the same.
2. The Ray run's per-task times give the critical path (the longest task: a model's training, its attacks,
   fits and scoring, one after the other) and the wall time a scheduler that starts the longest waiting
   task first (LPT) needs on W workers: max(longest task, about the sum / W), compared with the measured Ray
   wall time at `--workers`.
3. The same model applied to the MNIST + GTSRB grid, with per-task times taken from the pieces recorded for
   issue 5 in BENCHMARKS.md (model training and each attack's crafting and scoring on one core): an
   estimate on 8, 32 and 128 workers, not a measurement.

Writes benchmarks/results/study_ray.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import heapq
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "malex-out" / "study_ray"
TABLES = ("results.csv", "summary.csv", "results.md")

#: per-task seconds of the MNIST + GTSRB grid on one core, from BENCHMARKS.md (issue 5, "Wall time"):
#: GTSRB, per seed: the clean model's task = training (~450 s, of 392-511 s) + FGSM 554 s + PGD 80 s + CW 1,090 s;
#: each of the 5 backdoor tasks = training ~450 s + its cell's fitting and scoring ~490 s (of 400-581 s).
#: MNIST: 44 min of wall time on 2 shared cores for 3 seeds x 6 models; split here evenly over its 18 tasks.
GTSRB_TRAIN, GTSRB_CW = 450, 1090
GTSRB_TASKS = [GTSRB_TRAIN + 554 + 80 + GTSRB_CW] * 3 + [GTSRB_TRAIN + 490] * 15
MNIST_TASKS = [44 * 60 / 18] * 18


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "digits.toml")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "study_ray.md")
    p.add_argument("--one", choices=("local", "ray"), help=argparse.SUPPRESS)  # internal: one run, JSON on stdout
    return p.parse_args()


def log(msg: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {msg}", flush=True)


def run_one(kind: str, config: Path, workers: int) -> dict:
    """One run of the grid into a fresh folder, in this process: its wall time (and the tasks' times on Ray)."""
    import torch

    from malex.evaluate.study import Study, load_config

    torch.set_num_threads(1)
    out = CACHE / kind
    shutil.rmtree(out, ignore_errors=True)
    study = Study(load_config(config), out, progress=False)
    text = config.read_text(encoding="utf-8")
    began = time.perf_counter()
    if kind == "local":
        run, tasks = study.run(text, report=False), []
    else:
        from malex.evaluate.study.on_ray import run_study_on_ray

        run, tasks = run_study_on_ray(study, text, "local", workers, report=False)
    return {"kind": kind, "seconds": time.perf_counter() - began, "cells": len(run.computed),
            "tasks": [{"label": t.task.label, "seconds": t.seconds, "worker": t.worker, "cells": len(t.computed)}
                      for t in tasks]}


def lpt_makespan(times: list[float], workers: int) -> float:
    """Wall time of independent tasks on `workers` when the longest waiting task starts first."""
    finish = [0.0] * workers
    for t in sorted(times, reverse=True):
        heapq.heapreplace(finish, finish[0] + t)
    return max(finish)


def main() -> None:
    args = parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.config, args.workers)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    loads, results = [" ".join(f"{x:.2f}" for x in os.getloadavg())], {}
    for kind in ("local", "ray"):
        log(f"{kind} run of {args.config.name}")
        done = subprocess.run([sys.executable, __file__, "--one", kind, "--config", str(args.config), "--workers",
                               str(args.workers)], env=env, capture_output=True, text=True, check=False)
        if done.returncode:
            raise SystemExit(f"{kind} failed:\n{done.stderr[-3000:]}")
        results[kind] = json.loads(done.stdout.strip().splitlines()[-1])
        loads.append(" ".join(f"{x:.2f}" for x in os.getloadavg()))
        log(f"  {results[kind]['seconds']:.0f} s")
    same = {t: (CACHE / "local" / t).read_bytes() == (CACHE / "ray" / t).read_bytes() for t in TABLES}
    write(args, results, same, loads)


def write(args, results: dict, same: dict, loads: list[str]) -> None:
    local, ray = results["local"], results["ray"]
    times = [t["seconds"] for t in ray["tasks"]]
    longest = max(ray["tasks"], key=lambda t: t["seconds"])
    lines = ["# A study grid on Ray (issue 18)", "",
             f"`{shlex.join(['python', 'benchmarks/study_ray.py', *sys.argv[1:]])}` on {dt.date.today()}, "
             f"{platform.machine()}, {os.cpu_count()} CPU cores shared with three other engineers' jobs (load "
             f"average 1/5/15 min before, between and after the runs: {'; '.join(loads)}); one torch thread per "
             "process. The times are under that load.", "",
             f"`{args.config.relative_to(ROOT)}`: {local['cells']} cells, {len(times)} Ray tasks (one per model "
             "of each dataset and seed).", "",
             "| run | wall s | vs local |", "|---|---:|---:|",
             f"| local (one process) | {local['seconds']:.0f} | 1.00x |",
             f"| Ray, {args.workers} workers | {ray['seconds']:.0f} | {local['seconds'] / ray['seconds']:.2f}x "
             "faster |", "",
             "Tables identical (byte for byte): " + ", ".join(f"{t} {'yes' if s else 'NO'}" for t, s in same.items()),
             "", "Per-task times on Ray (s):", "", "| task | cells | s | worker |", "|---|---:|---:|---|"]
    lines += [f"| {t['label']} | {t['cells']} | {t['seconds']:.0f} | {t['worker']} |" for t in ray["tasks"]]
    lines += ["", f"Critical path: the longest task, {longest['label']}, {longest['seconds']:.0f} s; the sum of the "
              f"tasks {sum(times):.0f} s. Model (independent tasks, longest first): wall on {args.workers} workers "
              f"{lpt_makespan(times, args.workers):.0f} s, measured {ray['seconds']:.0f} s (the difference: Ray's "
              "start, the workers' imports, the tables at the end, and the shared cores).", "",
              "## Estimate for the MNIST + GTSRB grid", "",
              "Per-task times from the pieces recorded for issue 5 (BENCHMARKS.md, one core each): GTSRB's clean "
              "model task (training ~450 s, FGSM 554 s, PGD 80 s, CW 1,090 s) 2,174 s per seed, each backdoor task "
              "(training ~450 s + fitting and scoring ~490 s) 940 s; MNIST's 44 minutes spread over its 18 "
              f"tasks. Sum {sum(GTSRB_TASKS + MNIST_TASKS) / 3600:.1f} h on one worker.", "",
              "| workers | estimated wall | bound by |", "|---:|---:|---|"]
    every = GTSRB_TASKS + MNIST_TASKS
    for w in (1, 8, 32, 128):
        span = lpt_makespan(every, w)
        bound = "the longest task (GTSRB clean model: training, then CW)" if span <= max(every) + 1 else "total work / W"
        lines.append(f"| {w} | {span / 60:.0f} min | {bound} |")
    bound_from = next(w for w in range(1, len(every) + 1) if lpt_makespan(every, w) <= max(every) + 1)
    lines += ["", f"From {bound_from} workers on, the grid is bound by its longest task, the GTSRB clean model's "
              "(training, then its three attacks one after the other, CW the longest): more workers do not help "
              "until that task is split (each attack crafted by a task of its own once the model exists, CW's "
              "inputs in chunks), which would bring the critical path down to about training + CW crafting = "
              f"{GTSRB_TRAIN + GTSRB_CW:,} s plus that cell's scoring; below that only a faster CW (a GPU) or "
              "shorter training helps. This split is not built: today a task is one model and all its cells."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
