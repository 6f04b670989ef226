"""Prometheus metrics of one service instance, in its own registry (no process-wide state)."""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from malex.guard import ADVERSARIAL, BACKDOOR, BENIGN
from malex.serve.batcher import BatchStats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServeMetrics:
    """Requests, latency, verdicts, withheld predictions, forward passes and queue length."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("malex_requests", "HTTP requests answered", ["endpoint", "method", "status"],
                                registry=r)
        self.latency = Histogram("malex_request_latency_seconds", "Time from request to the end of the response",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.inputs = Counter("malex_inputs", "Inputs received in accepted requests", ["endpoint"], registry=r)
        self.verdicts = Counter("malex_verdicts", "Screened inputs by verdict", ["verdict"], registry=r)
        self.withheld = Counter("malex_predictions_withheld", "Predictions withheld from flagged inputs", registry=r)
        self.forward_passes = Counter("malex_forward_passes", "Batched forward passes", ["batcher"], registry=r)
        self.batch_inputs = Histogram("malex_batch_inputs", "Inputs per forward pass", ["batcher"],
                                      buckets=BATCH_BUCKETS, registry=r)
        self.batch_requests = Histogram("malex_batch_requests", "Requests per forward pass", ["batcher"],
                                        buckets=BATCH_BUCKETS, registry=r)
        self.forward_seconds = Histogram("malex_forward_seconds", "Seconds per forward pass", ["batcher"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Gauge("malex_queue_inputs", "Inputs waiting for a forward pass", ["batcher"], registry=r)
        for verdict in (BENIGN, ADVERSARIAL, BACKDOOR):
            self.verdicts.labels(verdict)

    def batch_observer(self, batcher: str):
        """A callback for `MicroBatcher(on_batch=...)` that records each forward pass of `batcher`."""
        self.forward_passes.labels(batcher)

        def observe(stats: BatchStats) -> None:
            self.forward_passes.labels(batcher).inc()
            self.batch_inputs.labels(batcher).observe(stats.inputs)
            self.batch_requests.labels(batcher).observe(stats.requests)
            self.forward_seconds.labels(batcher).observe(stats.seconds)

        return observe

    def queue_observer(self, batcher: str):
        """A callback for `MicroBatcher(on_queue=...)` that sets the queue gauge of `batcher`."""
        gauge = self.queue.labels(batcher)
        return gauge.set

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of this registry, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}


class MetricsMiddleware:
    """ASGI middleware that counts every HTTP request by route, method and status and times it."""

    def __init__(self, app, metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_note(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            endpoint = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope.get("method", "") if scope.get("method", "") in _METHODS else "other"
            self.metrics.requests.labels(endpoint, method, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
