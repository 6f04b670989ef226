"""Chaos: kill -9 the HTTP service under load, restart it, and check it answers exactly as before.

Run by hand from the repository root (needs the `serve` and `bench` extras):

    python benchmarks/serve_chaos.py --rounds 3 --load-seconds 10

Starts `malex serve` (the cached BadNets digits model and its guard, see serve_setup.py) on loopback and
records its answers to a fixed reference set (/v1/screen and /v1/predict on batches of clean and noisy
digits, and /v1/info). Then, each round: valid load from several client threads, SIGKILL of the
service in the middle of it, a fresh service from the same files, and the reference set again; the
answers must be identical (the JSON compared exactly, info included). Writes
benchmarks/results/serve_chaos.md; exits 1 when any answer differs.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from serve_hostile import npy
from serve_setup import ServiceProcess, add_serve_args, guard_files

from malex.data import load_digits


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_args(p)
    p.add_argument("--rounds", type=int, default=3, help="kill -9 and restart this many times")
    p.add_argument("--load-seconds", type=float, default=10.0, help="seconds of load before each kill")
    p.add_argument("--clients", type=int, default=8, help="load threads")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_chaos.md"))
    return p.parse_args(argv)


def reference_answers(url: str, batches: list[bytes]) -> list:
    """The service's answers to the fixed reference set, in order."""
    headers = {"content-type": "application/x-npy"}
    with httpx.Client(base_url=url, timeout=120) as client:
        out = [client.get("/v1/info").json()]
        for path in ("/v1/screen", "/v1/predict"):
            for body in batches:
                res = client.post(path, content=body, headers=headers)
                out.append((path, res.status_code, res.json()))
    return out


def load_until_killed(url: str, bodies: list[bytes], clients: int, stop: threading.Event) -> Counter:
    """Valid requests from `clients` threads until `stop` is set; outcomes by status or error name."""
    outcomes: Counter = Counter()

    def client(k: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            i = k
            while not stop.is_set():
                try:
                    res = c.post("/v1/screen" if i % 2 else "/v1/predict", content=bodies[i % len(bodies)],
                                 headers={"content-type": "application/x-npy"})
                    outcomes[str(res.status_code)] += 1
                except httpx.HTTPError as exc:
                    outcomes[type(exc).__name__] += 1
                    time.sleep(0.05)
                i += clients

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    stop.wait()
    for t in threads:
        t.join(timeout=60)
    return outcomes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model_path, guard_path, origin = guard_files(args)
    print(origin)
    x = load_digits(args.seed).test.x.numpy()
    rng = np.random.default_rng(0)
    noise = rng.random((4, *x.shape[1:]), dtype=np.float32)
    batches = [npy(x[:1]), npy(x[1:9]), npy(noise), npy(np.concatenate([x[9:13], noise[:2]]))]
    bodies = [npy(x[i : i + 1 + i % 4]) for i in range(64)]
    with ServiceProcess(model_path, guard_path, args) as url:
        expected = reference_answers(url, batches)
    rows, differing = [], 0
    for r in range(args.rounds):
        service = ServiceProcess(model_path, guard_path, args)
        with service as url:
            stop = threading.Event()
            result: dict = {}
            loader = threading.Thread(target=lambda: result.update(load_until_killed(url, bodies, args.clients, stop)))
            loader.start()
            time.sleep(args.load_seconds)
            service.proc.kill()  # SIGKILL: no shutdown, no draining
            code = service.proc.wait()
            time.sleep(0.5)
            stop.set()
            loader.join()
        started = time.perf_counter()
        with ServiceProcess(model_path, guard_path, args) as url:
            restart_s = time.perf_counter() - started
            again = reference_answers(url, batches)
        same = again == expected
        differing += not same
        rows.append([str(r + 1), ", ".join(f"{k}: {n}" for k, n in sorted(result.items())), str(code),
                     f"{restart_s:.1f}", "yes" if same else "NO"])
        print(f"round {r + 1}: load {rows[-1][1]}; exit {code}; restarted in {restart_s:.1f} s; identical {same}")
    lines = ["# HTTP service chaos: kill -9 under load, restart, same answers", "",
             f"`python benchmarks/serve_chaos.py --rounds {args.rounds} --load-seconds {args.load_seconds:g} "
             f"--clients {args.clients}`", "", origin, "",
             f"Reference set: /v1/info, and {len(batches)} batches (1, 8, 4 noise, 6 mixed inputs) to /v1/screen "
             "and /v1/predict; compared as JSON, exactly, with the answers of a service that was never killed.", "",
             "| round | load outcomes before and at the kill | exit status | restart to healthy (s) | identical answers |",
             "|---:|---|---:|---:|---|", *["| " + " | ".join(row) + " |" for row in rows]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
