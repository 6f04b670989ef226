"""What the HTTP-service benchmarks share: a cached model and guard, and `malex serve` run as a subprocess.

The model is the BadNets-poisoned digits model of the peer comparisons (`peer_model.py`, cached under
cache/); the guard is fitted on the digits validation split and cached beside it. The service runs in
its own process (its own interpreter and GIL), listening on loopback only.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from peer_model import ARCH, add_model_args, poisoned_model

from malex.data import load_digits
from malex.errors import ModelFileError
from malex.guard import Guard, GuardConfig
from malex.guard.guard import detectors_from
from malex.models import load_model, save_model

HOST = "127.0.0.1"


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The model, the guard and the service's settings."""
    add_model_args(p)
    p.add_argument("--detectors", default=",".join(GuardConfig.detectors), help="the guard's detectors")
    p.add_argument("--fpr", type=float, default=0.05, help="the guard's target false-positive rate")
    p.add_argument("--max-batch", type=int, default=64, help="service: most inputs per forward pass")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="service: longest wait to fill a batch")
    p.add_argument("--server-threads", type=int, default=1, help="torch threads in the service process")


def guard_files(args: argparse.Namespace) -> tuple[Path, Path, str]:
    """(model file, guard file, how they were obtained): from cache/, or trained / fitted and cached."""
    data = load_digits(args.seed)
    model, origin = poisoned_model(data, args)
    stem = f"serve_{ARCH}_badnets{args.trigger_size}_t{args.target}_r{args.rate}_seed{args.seed}_e{args.epochs}"
    model_path = args.cache / f"{stem}.safetensors"
    if not model_path.is_file():
        save_model(model, model_path, ARCH, info={"dataset": "digits", "from": origin})
    model, _ = load_model(model_path)
    detectors = detectors_from(args.detectors)
    guard_path = args.cache / f"{stem}_guard_{'-'.join(detectors)}_fpr{args.fpr}.safetensors"
    if guard_path.is_file():
        try:
            Guard.load(guard_path, model)
            return model_path, guard_path, f"model {origin}; guard loaded from {guard_path}"
        except ModelFileError:  # written by another malex version or for another model: fit again
            pass
    start = time.perf_counter()
    guard = Guard(model, GuardConfig(detectors=detectors, fpr=args.fpr, seed=args.seed, progress=False))
    guard.fit(data.val.x, data.val.y).save(guard_path, overwrite=True)
    return model_path, guard_path, (f"model {origin}; guard fitted on {len(data.val.x)} clean inputs in "
                                    f"{time.perf_counter() - start:.1f}s and saved to {guard_path}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ServiceProcess:
    """`with ServiceProcess(model, guard, args) as url:` runs `malex serve` on a free loopback port."""

    def __init__(self, model_path: Path, guard_path: Path, args: argparse.Namespace, *extra: str) -> None:
        self.port = free_port()
        self.command = [sys.executable, "-m", "malex.cli", "serve", str(guard_path), "--model", str(model_path),
                        "--host", HOST, "--port", str(self.port), "--max-batch", str(args.max_batch),
                        "--max-wait-ms", str(args.max_wait_ms), "--log-level", "warning", *extra]
        threads = str(args.server_threads)
        self.env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def __enter__(self) -> str:
        # the log goes to a file: a pipe nobody reads fills up under hostile load and blocks the service
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.command, env=self.env, stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 120
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the service exited: {self.log_text()}")
                try:
                    if client.get("/healthz").status_code == 200:
                        return self.url
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError("the service did not answer /healthz within 120 s")
                time.sleep(0.2)

    def log_text(self) -> str:
        """What the service has logged so far."""
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
