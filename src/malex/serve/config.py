"""Settings of the HTTP service, checked once when the service is built."""

from __future__ import annotations

from dataclasses import dataclass

from malex.errors import ConfigError


@dataclass(frozen=True)
class ServeConfig:
    """How the service batches, what it accepts, and whether it withholds flagged predictions.

    `protect`: withhold the model's prediction of every flagged input (a request may ask for it with
    `?protect=true`, never turn it off). `predict_endpoint`: also answer `POST /v1/predict` with the
    plain model's unscreened predictions (for comparison; it bypasses the guard, so by default it is
    served only when `protect` is off).
    `max_batch`: most inputs in one request and in one forward pass. `max_wait_ms`: longest a queued
    request waits for others to join its forward pass. `max_body_bytes`: largest request body.
    `max_queue`: most inputs waiting at once; more are refused with 503 until the queue drains.
    `max_image_pixels`: largest PNG/JPEG the service decodes.
    """

    protect: bool = False
    predict_endpoint: bool | None = None
    max_batch: int = 64
    max_wait_ms: float = 5.0
    max_body_bytes: int = 8 * 1024 * 1024
    max_queue: int = 1024
    max_image_pixels: int = 4096 * 4096

    def __post_init__(self) -> None:
        if self.predict_endpoint is None:
            object.__setattr__(self, "predict_endpoint", not self.protect)
        if self.max_batch < 1:
            raise ConfigError(f"max_batch is {self.max_batch}; expected at least 1")
        if not 0 <= self.max_wait_ms <= 60_000:
            raise ConfigError(f"max_wait_ms is {self.max_wait_ms}; expected 0 to 60000")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"max_body_bytes is {self.max_body_bytes}; expected at least 1024")
        if self.max_queue < self.max_batch:
            raise ConfigError(f"max_queue is {self.max_queue}; expected at least max_batch ({self.max_batch})")
        if self.max_image_pixels < 1:
            raise ConfigError(f"max_image_pixels is {self.max_image_pixels}; expected at least 1")
