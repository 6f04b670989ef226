"""An asyncio micro-batcher: requests arriving together share one forward pass.

Requests queue their inputs; one loop takes the first waiting request, then keeps taking queued ones
until the batch holds `max_batch` inputs or `max_wait_ms` have passed since it started collecting,
runs the batch in a worker thread (so the event loop keeps accepting requests meanwhile) and hands
each request its own slice of the result. A request that would overflow the batch starts the next one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from malex.errors import ConfigError
from malex.serve.errors import Overloaded, ServiceError

R = TypeVar("R")
T = TypeVar("T")


@dataclass
class _Job:
    x: torch.Tensor
    future: asyncio.Future


@dataclass(frozen=True)
class BatchStats:
    """What one forward pass did: inputs, requests, seconds in the worker thread."""

    inputs: int
    requests: int
    seconds: float


class MicroBatcher(Generic[R, T]):
    """Collect queued inputs into batches of at most `max_batch`, waiting at most `max_wait_ms`.

    `run(x)` computes the result for a whole batch (in the executor given to `start`);
    `take(result, start, stop)` cuts out one request's part. `on_batch(stats)` is told about every
    forward pass; `on_queue(n)` about the number of inputs waiting.
    """

    def __init__(self, run: Callable[[torch.Tensor], R], take: Callable[[R, int, int], T], *,
                 max_batch: int, max_wait_ms: float, max_queue: int,
                 on_batch: Callable[[BatchStats], None] | None = None,
                 on_queue: Callable[[int], None] | None = None) -> None:
        if max_batch < 1 or max_wait_ms < 0 or max_queue < max_batch:
            raise ConfigError(f"batcher settings max_batch={max_batch}, max_wait_ms={max_wait_ms}, "
                              f"max_queue={max_queue}; expected max_batch >= 1, max_wait_ms >= 0, "
                              "max_queue >= max_batch")
        self.run, self.take = run, take
        self.executor: Executor | None = None
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000.0, max_queue
        self.on_batch, self.on_queue = on_batch, on_queue
        self.forward_passes = 0
        self.pending = 0
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None

    async def start(self, executor: Executor) -> None:
        """Start the batching loop on the running event loop; forward passes run in `executor`."""
        if self._task is None:
            self.executor = executor
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="malex-batcher")

    async def stop(self) -> None:
        """Stop the loop; requests still waiting are answered with a 503."""
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None
        while self._queue is not None and not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(Overloaded("the service is shutting down; retry on another instance"))
        self._set_pending(0)

    async def submit(self, x: torch.Tensor) -> T:
        """Queue `x` (N inputs, N <= max_batch) and wait for its part of a batched result."""
        if self._task is None or self._queue is None:
            raise ServiceError(503, "not_ready", "the service is not running (starting up or shutting down)")
        n = int(x.shape[0])
        if n > self.max_batch:
            raise ServiceError(413, "batch_too_large", f"{n} inputs in one request; at most {self.max_batch}")
        if self.pending + n > self.max_queue:
            raise Overloaded(f"{self.pending} inputs are already waiting (at most {self.max_queue}); retry shortly")
        future = asyncio.get_running_loop().create_future()
        self._set_pending(self.pending + n)
        self._queue.put_nowait(_Job(x, future))
        return await future

    def _set_pending(self, n: int) -> None:
        self.pending = n
        if self.on_queue is not None:
            self.on_queue(n)

    async def _collect(self, first: _Job) -> tuple[list[_Job], _Job | None]:
        """`first` and the queued jobs that join it; a job that would overflow the batch is returned apart."""
        loop = asyncio.get_running_loop()
        jobs, size = [first], int(first.x.shape[0])
        deadline = loop.time() + self.max_wait
        while size < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), remaining)
                except (asyncio.TimeoutError, TimeoutError):
                    break
            if size + int(job.x.shape[0]) > self.max_batch:
                return jobs, job
            jobs.append(job)
            size += int(job.x.shape[0])
        return jobs, None

    async def _loop(self) -> None:
        carry: _Job | None = None
        while True:
            first = carry if carry is not None else await self._queue.get()
            jobs, carry = await self._collect(first)
            self._set_pending(self.pending - sum(int(j.x.shape[0]) for j in jobs))
            jobs = [j for j in jobs if not j.future.done()]  # a cancelled request needs no answer
            if not jobs:
                continue
            try:
                await self._forward(jobs)
            except asyncio.CancelledError:
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(Overloaded("the service is shutting down; retry later"))
                raise
            except Exception as exc:  # the batch failed: every request in it gets the error
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)

    async def _forward(self, jobs: list[_Job]) -> None:
        """One forward pass over the jobs' inputs; each job gets its slice of the result."""
        x = torch.cat([j.x for j in jobs]) if len(jobs) > 1 else jobs[0].x
        started = time.perf_counter()
        result = await asyncio.get_running_loop().run_in_executor(self.executor, self.run, x)
        self.forward_passes += 1
        if self.on_batch is not None:
            self.on_batch(BatchStats(int(x.shape[0]), len(jobs), time.perf_counter() - started))
        start = 0
        for job in jobs:
            stop = start + int(job.x.shape[0])
            if not job.future.done():
                job.future.set_result(self.take(result, start, stop))
            start = stop
