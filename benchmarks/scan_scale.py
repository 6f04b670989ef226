"""Scan throughput on one machine and on Ray, memory per worker, and a killed Ray actor (issue 18).

Run by hand from the repository root (not in CI; needs the ray extra):

    python benchmarks/scan_scale.py

1. Caches under malex-out/scan_scale/: an MNIST CNN trained briefly (`--epochs`, seed 0), the default guard
   fitted on MNIST's clean validation split, and a source of `--shards` .npy shards of 10,000 MNIST images each
   (the 70,000 train + test images, then repeated from the start: 100,000 inputs by default).
2. Throughput, in one run, each configuration in its own process, interleaved over `--repeats`: the local
   chunked scan (`malex.scan.scan_to_folder` on this machine, one torch thread) and the Ray scan with 1 and 2
   actors (one CPU and one torch thread each; the private Ray instance is started before the clock starts,
   the actors' start, model and guard loading count). Inputs/s over the whole source, and each worker's peak
   resident memory.
3. The local chunked scan's peak memory on the first shard (10,000 inputs) and on the whole source.
4. Fault tolerance: `malex scan ... --ray --actors 2` as a user runs it; when the actors have begun a few
   parts, the process of the actor that began the newest one is killed (SIGKILL). Checked: the scan ends with
   status 0, its output holds every input exactly once with the rows and scores of the local scan, and what it
   says about the retried part.

Writes benchmarks/results/scan_scale.md (with the command, the machine and its load average).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "malex-out" / "scan_scale"
SHARD = 10_000
#: the niceness Ray gives its worker processes here (seen with ps: 19 under a driver at 10)
RAY_WORKER_NICENESS = 19


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=10, help="shards of 10,000 MNIST images (10: 100,000 inputs)")
    p.add_argument("--epochs", type=int, default=1, help="training epochs of the cached MNIST CNN")
    p.add_argument("--part-size", type=int, default=4096, help="inputs per part")
    p.add_argument("--repeats", type=int, default=1, help="throughput runs per configuration")
    p.add_argument("--skip-fault", action="store_true", help="leave out the killed-actor run")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scan_scale.md")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration in this process
    p.add_argument("--source", help=argparse.SUPPRESS)
    p.add_argument("--dest", help=argparse.SUPPRESS)
    return p.parse_args()


def log(msg: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {msg}", flush=True)


def prepare(shards: int, epochs: int) -> tuple[Path, Path, Path]:
    """(model file, guard file, source folder), made once and cached."""
    import torch

    from malex.attacks.backdoor import train_model
    from malex.data import load_dataset
    from malex.guard import Guard, GuardConfig
    from malex.models import save_model
    from malex.models.train import TrainConfig

    torch.set_num_threads(1)
    CACHE.mkdir(parents=True, exist_ok=True)
    model_file, guard_file = CACHE / f"mnist_cnn_e{epochs}.safetensors", CACHE / f"guard_e{epochs}.safetensors"
    data = None
    if not model_file.is_file():
        data = load_dataset("mnist", seed=0)
        log(f"training mnist_cnn for {epochs} epoch(s)")
        trained = train_model(data, "mnist_cnn", TrainConfig(epochs=epochs, seed=0, shift=2))
        save_model(trained.model, model_file, "mnist_cnn", info={"dataset": "mnist", **trained.info()})
        log(f"clean test accuracy {trained.clean_accuracy:.3f}")
    if not guard_file.is_file():
        from malex.models.io import load_model

        data = data or load_dataset("mnist", seed=0)
        log("fitting the default guard on MNIST's validation split")
        guard = Guard(load_model(model_file)[0], GuardConfig(seed=0))
        guard.fit(data.val.x, data.val.y)
        guard.save(guard_file)
    source = CACHE / f"source-{shards}"
    if len(list(source.glob("*.npy"))) != shards:
        source.mkdir(exist_ok=True)
        with np.load(ROOT.parent / "shared" / "data" / "mnist.npz") as d:
            images = np.concatenate([d["x_train"], d["x_test"]])  # (70000, 28, 28, 1) uint8
        order = np.arange(shards * SHARD) % len(images)
        for i in range(shards):
            np.save(source / f"mnist-{i:03d}.npy", images[order[i * SHARD:(i + 1) * SHARD]])
    return model_file, guard_file, source


def run_one(kind: str, model_file: Path, guard_file: Path, source: str, dest: Path, part_size: int) -> dict:
    """One configuration in this process: 'local' or 'rayN' (N actors); the report as a dict."""
    import shutil

    import torch

    from malex.guard.spec import GuardSpec
    from malex.models import ModelSpec
    from malex.scan import ScanSettings, scan_to_folder

    torch.set_num_threads(1)
    shutil.rmtree(dest, ignore_errors=True)
    spec = GuardSpec(guard_file, ModelSpec(model_file))
    actors, ray_started = 0, 0.0
    if kind == "local":  # Ray runs its workers at niceness 19; the local scan runs at the same
        os.nice(max(0, RAY_WORKER_NICENESS - os.nice(0)))
    else:
        from malex.cluster import import_ray, start_ray

        actors = int(kind[3:])
        began = time.perf_counter()
        start_ray(import_ray(), "local", actors)
        ray_started = time.perf_counter() - began
    settings = ScanSettings(part_size=part_size, ray="local" if actors else None, actors=max(actors, 1),
                            progress=False)
    report = scan_to_folder(source, spec, dest, settings)
    if actors:
        import ray

        ray.shutdown()
    return {"kind": kind, "inputs": report.inputs, "seconds": report.seconds, "ray_start_s": ray_started,
            "rate": report.computed_inputs / report.seconds, "peaks": report.peak_rss_mib(),
            "cpu_s": sum(report.cpu_seconds().values()), "niceness": os.nice(0) if not actors else None,
            "workers": len(report.peak_rss_mib()), "retried": report.retried}


def in_child(kind: str, args: argparse.Namespace, source: str, dest: Path) -> dict:
    """`run_one` in a fresh process (its peak memory is its own), one torch thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--one", kind, "--source", source, "--dest", str(dest),
           "--part-size", str(args.part_size), "--epochs", str(args.epochs), "--shards", str(args.shards)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def read_rows(folder: Path) -> dict:
    import pyarrow.parquet as pq

    return pq.read_table(folder).to_pydict()


def fault_run(model_file: Path, guard_file: Path, source: Path, dest: Path, reference: Path, part_size: int) -> dict:
    """The CLI on Ray with 2 actors; SIGKILL to the actor that began the newest part once 3 parts are begun."""
    import shutil

    shutil.rmtree(dest, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "malex.cli", "scan", str(guard_file), str(source), "--model", str(model_file),
           "--out-dir", str(dest), "--part-size", str(part_size), "--ray", "--actors", "2", "--quiet"]
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed: dict = {}

    def killer() -> None:
        notes = dest / ".attempts"
        while proc.poll() is None and not killed:
            names = sorted(notes.glob("*@*@*"), key=lambda f: int(f.name.rpartition("@")[2])) if notes.is_dir() else []
            if len(names) >= 3:
                part, worker, _ = names[-1].name.split("@")
                pid = int(worker.rpartition(":")[2])
                os.kill(pid, signal.SIGKILL)
                killed.update(part=part, pid=pid, after_s=time.perf_counter() - began,
                              parts_done=len(list(dest.glob("part-*.parquet"))))
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=killer)
    watcher.start()
    stdout, stderr = proc.communicate()
    watcher.join()
    rows, ref = read_rows(dest), read_rows(reference)
    keys = list(zip(rows["source"], rows["index"]))
    same = all(rows[k] == ref[k] for k in ref)
    said = [" ".join(line.split()) for line in stderr.splitlines() if "retried" in line or "inputs in" in line]
    return {"status": proc.returncode, "seconds": time.perf_counter() - began, "killed": killed,
            "rows": len(keys), "unique": len(set(keys)), "same_as_local": same, "said": said,
            "stderr_tail": stderr[-2000:] if proc.returncode else ""}


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    args = parse_args()
    if args.one:
        model_file, guard_file, _ = prepare(args.shards, args.epochs)
        print(json.dumps(run_one(args.one, model_file, guard_file, args.source, Path(args.dest), args.part_size)))
        return
    began = time.perf_counter()
    loads = [load_average()]
    model_file, guard_file, source = prepare(args.shards, args.epochs)
    runs = CACHE / "runs"
    results: dict[str, list[dict]] = {"local": [], "ray1": [], "ray2": []}
    for r in range(args.repeats):
        for kind in results:
            log(f"throughput {kind}, repeat {r + 1}/{args.repeats}")
            results[kind].append(in_child(kind, args, str(source), runs / kind))
            log(f"  {results[kind][-1]['rate']:.0f} inputs/s")
            loads.append(load_average())
    log("memory: local chunked scan on 10,000 inputs")
    small = in_child("local", args, str(source / "mnist-000.npy"), runs / "local-10k")
    fault = None
    if not args.skip_fault:
        log("fault tolerance: killing one actor mid-scan")
        fault = fault_run(model_file, guard_file, source, runs / "fault", runs / "local", args.part_size)
        log(f"  {fault}")
    loads.append(load_average())
    write(args, results, small, fault, loads, time.perf_counter() - began)


def _mean_std(values: list[float]) -> str:
    a = np.asarray(values, dtype=float)
    return f"{a.mean():,.0f}" if len(a) == 1 else f"{a.mean():,.0f} ± {a.std(ddof=1):,.0f} ({', '.join(f'{v:,.0f}' for v in a)})"


def write(args, results: dict, small: dict, fault: dict | None, loads: list[str], seconds: float) -> None:
    local_rate = np.mean([r["rate"] for r in results["local"]])
    lines = ["# Scan throughput, memory and a killed actor (issue 18)", "",
             f"`{shlex.join(['python', 'benchmarks/scan_scale.py', *sys.argv[1:]])}` on {dt.date.today()}, "
             f"{platform.machine()}, {os.cpu_count()} CPU cores shared with three other engineers' jobs (load "
             f"average 1/5/15 min during the run: {'; '.join(loads)}), Python {platform.python_version()}; "
             f"{seconds / 60:.1f} min in all. The numbers are under that load.", "",
             f"Source: {args.shards} .npy shards of 10,000 MNIST images (train + test, repeated from the start), "
             f"{args.shards * SHARD:,} inputs; parts of {args.part_size} inputs; the default guard (mutation_adv, "
             "mutation_bd, kd_bu, mahalanobis) on an MNIST CNN trained for "
             f"{args.epochs} epoch(s); one torch thread per worker; runs per configuration: {args.repeats}.", "",
             "Inputs/s is wall-clock throughput over the whole scan (driver's guard check, planning, actors' "
             "start and guard loading, screening, writing), mean ± std over the runs; under the shared load it "
             "varies from run to run more than between configurations. CPU s per 1,000 inputs sums the workers' "
             "own CPU time (user + system, their start included), which the other jobs disturb much less. The "
             "local scan's process is set to niceness 19, the niceness Ray gives its workers here.", "",
             "| scan | inputs/s | vs local | wall s | workers | worker CPU s per 1,000 inputs | "
             "peak memory per worker (MiB) |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for kind, runs in results.items():
        rates = [r["rate"] for r in runs]
        peaks = sorted(v for r in runs for v in r["peaks"].values())
        name = {"local": "local chunked", "ray1": "Ray, 1 actor", "ray2": "Ray, 2 actors"}[kind]
        start = (f" (+ {np.mean([r['ray_start_s'] for r in runs]):.1f} s to start Ray)" if kind != "local" else "")
        cpu = [1000 * r["cpu_s"] / r["inputs"] for r in runs]
        lines.append(f"| {name} | {_mean_std(rates)} | {np.mean(rates) / local_rate:.2f}x | "
                     f"{np.mean([r['seconds'] for r in runs]):.1f}{start} | {runs[0]['workers']} | "
                     f"{np.mean(cpu):.2f} | {', '.join(f'{p:,.0f}' for p in peaks)} |")
    big = max(v for r in results["local"] for v in r["peaks"].values())
    lines += ["", "Local chunked scan, peak resident memory of the process (model, guard, one part):", "",
              "| inputs | peak MiB |", "|---:|---:|",
              f"| {small['inputs']:,} | {max(small['peaks'].values()):,.0f} |",
              f"| {results['local'][0]['inputs']:,} | {big:,.0f} |"]
    if fault is not None:
        k = fault["killed"]
        lines += ["", "## A killed actor", "",
                  "`malex scan GUARD SOURCE --model MODEL --out-dir DIR --ray --actors 2` on the same source; "
                  f"SIGKILL to actor pid {k.get('pid')} {k.get('after_s', float('nan')):.1f} s into the run, while "
                  f"it screened {k.get('part')} ({k.get('parts_done')} parts written by then).", "",
                  f"- exit status {fault['status']}, {fault['seconds']:.1f} s in all",
                  f"- rows written {fault['rows']:,}, distinct (source, index) {fault['unique']:,} of "
                  f"{args.shards * SHARD:,} inputs; every row and score equal to the local scan's: "
                  f"{fault['same_as_local']}",
                  "- what the run said:", ""] + [f"      {line}" for line in fault["said"]]
        if fault["stderr_tail"]:
            lines += ["", "```", fault["stderr_tail"], "```"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
