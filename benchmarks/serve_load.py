"""Load the HTTP service on loopback: requests/s and latency at batch 1, with and without the guard.

Run by hand from the repository root (needs the `serve` and `bench` extras):

    python benchmarks/serve_load.py --requests 2000 --duration 60 --concurrency 1 16

Starts `malex serve` (the cached BadNets digits model and its guard, see serve_setup.py) in its own
process on a free loopback port. For each endpoint and each concurrency level, that many clients (one
asyncio httpx client and connection each) send batch-1 requests (one clean digits test image as .npy)
back to back until `--requests` are answered or `--duration` seconds pass. "Without the guard" is
`POST /v1/predict` (the plain model's prediction through the same service: same decoding, same
micro-batcher); "with the guard" is `POST /v1/screen`. Reports requests/s, p50 and p99 latency, errors
(any non-200 answer or transport failure) and the mean inputs per forward pass (from /metrics), prints
a table and writes it as Markdown.

Soak (issue 16): `python benchmarks/serve_load.py --soak 330` runs, for that many seconds, a mix of
clients at once: valid batches of 1..8 inputs to /v1/screen and /v1/predict, clients that connect and
abort mid-upload, clients that send garbage (hostile JSON, float128 .npy, malformed HTTP), and
clients that connect and stay idle until the service drops them. Reports valid requests/s, their p50
and p99 latency, answers by status per client kind, the service's 5xx count, and its RSS every 10 s
(from /proc), written to benchmarks/results/serve_soak.md.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import sys
import time
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table
from serve_hostile import exchange, hostile_json, request
from serve_setup import ServiceProcess, add_serve_args, guard_files

from malex.data import load_digits

ENDPOINTS = (("without guard", "/v1/predict", "predict"), ("with guard", "/v1/screen", "screen"))
HEADERS = ["endpoint", "concurrency", "requests", "seconds", "requests/s", "p50 ms", "p99 ms", "errors",
           "inputs per forward pass"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_args(p)
    p.add_argument("--requests", type=int, default=2000, help="requests per endpoint and concurrency level")
    p.add_argument("--duration", type=float, default=60.0, help="most seconds per endpoint and concurrency level")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16], help="concurrent clients")
    p.add_argument("--warmup", type=int, default=32, help="requests sent before each measurement (by all clients)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_load.md"))
    p.add_argument("--soak", type=float, default=0.0, help="seconds of mixed-client soak instead of the table")
    p.add_argument("--soak-valid", type=int, default=8, help="valid clients at once in the soak")
    p.add_argument("--soak-out", type=Path, default=Path("benchmarks/results/serve_soak.md"))
    return p.parse_args(argv)


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


async def forward_passes(client: httpx.AsyncClient, batcher: str) -> tuple[float, float]:
    """(forward passes, inputs in them) of one batcher so far, from /metrics."""
    text = (await client.get("/metrics")).text
    values = {(s.name, s.labels.get("batcher")): s.value
              for family in text_string_to_metric_families(text) for s in family.samples}
    return (values.get(("malex_forward_passes_total", batcher), 0.0),
            values.get(("malex_batch_inputs_sum", batcher), 0.0))


async def measure(url: str, path: str, batcher: str, bodies: list[bytes], concurrency: int,
                  args: argparse.Namespace) -> dict:
    """One endpoint at one concurrency level: latencies, errors, throughput, inputs per forward pass.

    Each simulated client has its own httpx client and connection (one shared connection pool slows
    down at high concurrency on the client side, which would be measured as service latency)."""
    headers = {"content-type": "application/x-npy"}
    async with AsyncExitStack() as stack:
        control = await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=60))
        clients = [await stack.enter_async_context(httpx.AsyncClient(
            base_url=url, timeout=60, limits=httpx.Limits(max_connections=1))) for _ in range(concurrency)]

        async def warm(k: int) -> None:  # every client opens its connection before the clock starts
            for i in range(k, max(args.warmup, concurrency), concurrency):
                res = await clients[k].post(path, content=bodies[i % len(bodies)], headers=headers)
                res.raise_for_status()

        await asyncio.gather(*[warm(k) for k in range(concurrency)])
        passes0, inputs0 = await forward_passes(control, batcher)
        latencies: list[float] = []
        errors: Counter = Counter()
        sent = 0
        start = time.perf_counter()
        stop_at = start + args.duration

        async def worker(client: httpx.AsyncClient) -> None:
            nonlocal sent
            while sent < args.requests and time.perf_counter() < stop_at:
                body = bodies[sent % len(bodies)]
                sent += 1
                t0 = time.perf_counter()
                try:
                    res = await client.post(path, content=body, headers=headers)
                    if res.status_code != 200:
                        errors[str(res.status_code)] += 1
                    elif len(res.json().get("results", res.json().get("predictions", []))) != 1:
                        errors["wrong answer"] += 1
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] += 1
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*[worker(c) for c in clients])
        seconds = time.perf_counter() - start
        passes1, inputs1 = await forward_passes(control, batcher)
    lat = np.array(latencies) * 1e3
    return {"requests": len(latencies), "seconds": seconds, "rps": len(latencies) / seconds,
            "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
            "errors": sum(errors.values()), "error_kinds": dict(errors),
            "per_pass": (inputs1 - inputs0) / max(passes1 - passes0, 1)}


def rss_mib(pid: int) -> float:
    """Resident memory of process `pid` in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def soak(url: str, pid: int, shape: tuple[int, int, int], args) -> dict:
    """Mixed clients for `args.soak` seconds: valid, aborting, garbage and idle; RSS every 10 s."""
    port = int(url.rsplit(":", 1)[1])
    rng = np.random.default_rng(0)
    stop_at = time.perf_counter() + args.soak
    latencies: list[float] = []
    by_kind: dict[str, Counter] = {k: Counter() for k in ("valid", "abort", "garbage", "idle")}
    rss: list[tuple[float, float]] = []
    started = time.perf_counter()
    garbage = hostile_json(shape)
    x = load_digits(args.seed).test.x.numpy()

    async def valid(k: int) -> None:
        path = "/v1/screen" if k % 2 == 0 else "/v1/predict"
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            while time.perf_counter() < stop_at:
                n = int(rng.integers(1, 9))
                i = int(rng.integers(0, len(x) - n))
                t0 = time.perf_counter()
                try:
                    res = await client.post(path, content=npy(x[i : i + n]), headers={"content-type": "application/x-npy"})
                    by_kind["valid"][str(res.status_code)] += 1
                    if res.status_code == 200:
                        latencies.append(time.perf_counter() - t0)
                except httpx.HTTPError as exc:
                    by_kind["valid"][type(exc).__name__] += 1

    async def in_thread(kind: str, fn, pause: float) -> None:
        while time.perf_counter() < stop_at:
            by_kind[kind][await asyncio.to_thread(fn)] += 1
            await asyncio.sleep(pause)

    def abort() -> str:
        data = request("POST", "/v1/screen", b"\x93NUMPY" + b"\0" * 4000, "application/x-npy")
        return exchange(port, data[: data.index(b"\r\n\r\n") + 1000], close_after_send=True)

    def junk() -> str:
        k = int(rng.integers(0, len(garbage) + 1))
        if k == len(garbage):
            return exchange(port, b"NOT HTTP AT ALL\r\n\r\n")
        return exchange(port, request("POST", "/v1/screen", *garbage[k]))

    def idle() -> str:
        return exchange(port, b"", timeout=120)

    async def sample() -> None:
        while time.perf_counter() < stop_at:
            rss.append((time.perf_counter() - started, rss_mib(pid)))
            await asyncio.sleep(10)
        rss.append((time.perf_counter() - started, rss_mib(pid)))

    await asyncio.gather(sample(), *[valid(k) for k in range(args.soak_valid)],
                         *[in_thread("abort", abort, 0.05) for _ in range(2)],
                         *[in_thread("garbage", junk, 0.02) for _ in range(2)],
                         *[in_thread("idle", idle, 0.0) for _ in range(4)])
    seconds = time.perf_counter() - started
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        text = (await client.get("/metrics")).text
        healthy = (await client.get("/healthz")).status_code == 200
    server_statuses = Counter()
    for family in text_string_to_metric_families(text):
        for smp in family.samples:
            if smp.name == "malex_requests_total":
                server_statuses[smp.labels["status"]] += int(smp.value)
    lat = np.array(latencies) * 1e3
    return {"seconds": seconds, "valid": len(latencies), "rps": len(latencies) / seconds,
            "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)), "by_kind": by_kind,
            "server": server_statuses, "rss": rss, "healthy": healthy}


def write_soak(r: dict, args, origin: str, console: Console) -> int:
    """Print and write the soak's results; 1 when the service answered any 5xx or ended unhealthy."""
    fivexx = sum(n for s, n in r["server"].items() if s.startswith("5") and s != "503")
    warm = [v for t, v in r["rss"] if t >= 60] or [v for _, v in r["rss"]]
    lines = [f"# HTTP service soak: {r['seconds']:.0f} s of mixed clients", "",
             f"`python benchmarks/serve_load.py --soak {args.soak:g} --soak-valid {args.soak_valid}`", "",
             f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}; {origin}", "",
             f"Clients at once: {args.soak_valid} valid (batches of 1..8 inputs, half /v1/screen, half /v1/predict), "
             "2 connect-and-abort, 2 garbage (hostile JSON, float128 .npy, broken PNG/.npy, malformed HTTP), "
             "4 idle (connect, send nothing).", "",
             f"Valid requests answered 200: {r['valid']} ({r['rps']:.1f}/s), p50 {r['p50']:.1f} ms, "
             f"p99 {r['p99']:.1f} ms; service healthy at the end: {r['healthy']}; 5xx other than 503: {fivexx}", "",
             "| client kind | outcomes |", "|---|---|",
             *[f"| {k} | {', '.join(f'{s}: {n}' for s, n in sorted(c.items()))} |" for k, c in r["by_kind"].items()],
             "", "Service's own count (`malex_requests_total` by status): "
             + ", ".join(f"{s}: {n}" for s, n in sorted(r["server"].items())), "",
             f"RSS (MiB) every 10 s: {', '.join(f'{v:.0f}' for _, v in r['rss'])}", "",
             f"RSS after the first minute: {min(warm):.0f} to {max(warm):.0f} MiB (start {r['rss'][0][1]:.0f}, "
             f"end {r['rss'][-1][1]:.0f})"]
    for line in lines:
        console.print(line, markup=False)
    args.soak_out.parent.mkdir(parents=True, exist_ok=True)
    args.soak_out.write_text("\n".join(lines) + "\n")
    console.print(f"wrote {args.soak_out}")
    return 1 if fivexx or not r["healthy"] else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=150)
    model_path, guard_path, origin = guard_files(args)
    console.print(origin)
    if args.soak > 0:
        x = load_digits(args.seed).test.x
        service = ServiceProcess(model_path, guard_path, args)
        with service as url:
            result = asyncio.run(soak(url, service.proc.pid, tuple(x.shape[1:]), args))
        return write_soak(result, args, origin, console)
    x = load_digits(args.seed).test.x.numpy()
    bodies = [npy(x[i : i + 1]) for i in range(len(x))]  # batch 1: one (1, 1, 8, 8) image per request
    load_before = os.getloadavg()
    rows = []
    with ServiceProcess(model_path, guard_path, args) as url:
        for name, path, batcher in ENDPOINTS:
            for concurrency in args.concurrency:
                r = asyncio.run(measure(url, path, batcher, bodies, concurrency, args))
                rows.append([f"{name} ({path})", str(concurrency), str(r["requests"]), f"{r['seconds']:.1f}",
                             f"{r['rps']:.1f}", f"{r['p50']:.2f}", f"{r['p99']:.2f}",
                             str(r["errors"]) + (f" {r['error_kinds']}" if r["errors"] else ""),
                             f"{r['per_pass']:.2f}"])
                console.print(f"{name} at concurrency {concurrency}: {r['rps']:.1f} requests/s, "
                              f"p50 {r['p50']:.2f} ms, p99 {r['p99']:.2f} ms, {r['errors']} errors")
    load_after = os.getloadavg()
    title = (f"HTTP service on loopback, batch-1 requests (guard: {args.detectors}; max batch {args.max_batch}, "
             f"max wait {args.max_wait_ms:g} ms; {args.server_threads} torch thread(s) in the service)")
    table = Table(title=title)
    for h in HEADERS:
        table.add_column(h, justify="left" if h == "endpoint" else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    command = (f"python benchmarks/serve_load.py --requests {args.requests} --duration {args.duration:g} "
               f"--concurrency {' '.join(map(str, args.concurrency))}")
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}; "
               f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    lines = [f"# {title}", "", f"`{command}`", "", machine, "", origin, "",
             "| " + " | ".join(HEADERS) + " |", "|---|" + "---:|" * (len(HEADERS) - 1),
             *["| " + " | ".join(row) + " |" for row in rows]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    console.print(f"wrote {args.out}")
    return 1 if any(row[7] != "0" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
