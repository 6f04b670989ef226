"""Settings of the HTTP service, checked once when the service is built."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from malex.errors import ConfigError

#: names a client on this machine may put in its Host header
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
#: endpoints that may be left open when an API key is set
OPENABLE_ENDPOINTS = ("/healthz", "/metrics")
MIN_API_KEY_CHARS = 16


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or name to bind) is reachable only from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServeConfig:
    """How the service batches, what it accepts, who may ask, and whether it withholds flagged predictions.

    `protect`: withhold the model's prediction of every flagged input (a request may ask for it with
    `?protect=true`, never turn it off). `predict_endpoint`: also answer `POST /v1/predict` with the
    plain model's unscreened predictions (for comparison; it bypasses the guard, so by default it is
    served only when `protect` is off).
    `max_batch`: most inputs in one request and in one forward pass. `max_wait_ms`: longest a queued
    request waits for others to join its forward pass. `max_body_bytes`: largest request body, for every
    content type; None (the default) sizes it per content type for `max_batch` inputs of the model's shape.
    `max_queue`: most inputs waiting at once; more are refused with 503 until the queue drains.
    `max_image_pixels`: largest PNG/JPEG the service decodes.
    `host`: the address the service binds. `api_key`: when set, every request but those to
    `open_endpoints` must carry it (`Authorization: Bearer KEY` or `X-API-Key: KEY`); a non-loopback
    `host` needs one unless `allow_unauthenticated`. `allowed_hosts`: Host header names accepted (against
    DNS rebinding); None: the loopback names and `host`; `("*",)`: any. `docs`: serve /docs and /redoc
    (Swagger UI and ReDoc, which the browser loads from a CDN); the OpenAPI schema is always served.
    `keep_alive_s`: how long an idle keep-alive connection stays open. `request_read_s`: how long a
    request's head, and separately its body, may take to arrive. `max_connections`: most open
    connections; more are answered 503 and closed. `shutdown_grace_s`: on SIGTERM, how long requests
    already received may take to be answered before the service exits anyway.
    """

    protect: bool = False
    predict_endpoint: bool | None = None
    max_batch: int = 64
    max_wait_ms: float = 5.0
    max_body_bytes: int | None = None
    max_queue: int = 1024
    max_image_pixels: int = 4096 * 4096
    host: str = "127.0.0.1"
    api_key: str | None = field(default=None, repr=False)
    allow_unauthenticated: bool = False
    open_endpoints: tuple[str, ...] = ("/healthz",)
    allowed_hosts: tuple[str, ...] | None = None
    docs: bool = False
    keep_alive_s: float = 5.0
    request_read_s: float = 10.0
    max_connections: int = 256
    shutdown_grace_s: float = 10.0

    def __post_init__(self) -> None:
        if self.predict_endpoint is None:
            object.__setattr__(self, "predict_endpoint", not self.protect)
        if self.max_batch < 1:
            raise ConfigError(f"max_batch is {self.max_batch}; expected at least 1")
        if not 0 <= self.max_wait_ms <= 60_000:
            raise ConfigError(f"max_wait_ms is {self.max_wait_ms}; expected 0 to 60000")
        if self.max_body_bytes is not None and self.max_body_bytes < 1024:
            raise ConfigError(f"max_body_bytes is {self.max_body_bytes}; expected at least 1024 (or none: sized "
                              "for max_batch inputs of the model's shape)")
        if self.max_queue < self.max_batch:
            raise ConfigError(f"max_queue is {self.max_queue}; expected at least max_batch ({self.max_batch})")
        if self.max_image_pixels < 1:
            raise ConfigError(f"max_image_pixels is {self.max_image_pixels}; expected at least 1")
        self._check_access()
        for name in ("keep_alive_s", "request_read_s"):
            if not 0 < getattr(self, name) <= 3600:
                raise ConfigError(f"{name} is {getattr(self, name)}; expected more than 0, at most 3600 seconds")
        if not 0 <= self.shutdown_grace_s <= 3600:
            raise ConfigError(f"shutdown_grace_s is {self.shutdown_grace_s}; expected 0 to 3600 seconds")
        if self.max_connections < 1:
            raise ConfigError(f"max_connections is {self.max_connections}; expected at least 1")

    def _check_access(self) -> None:
        """The API key, the waiver for a public bind without one, the open endpoints and the Host names."""
        if self.api_key is not None and (len(self.api_key) < MIN_API_KEY_CHARS or not self.api_key.isprintable()
                                         or any(c.isspace() for c in self.api_key)):
            raise ConfigError(f"the API key has {len(self.api_key)} characters; expected at least "
                              f"{MIN_API_KEY_CHARS} printable ones without spaces")
        if not is_loopback(self.host) and self.api_key is None and not self.allow_unauthenticated:
            raise ConfigError(f"host {self.host} is reachable from other machines; expected an API key "
                              "(--api-key-file) or an explicit waiver (--allow-unauthenticated)")
        unknown = sorted(set(self.open_endpoints) - set(OPENABLE_ENDPOINTS))
        if unknown:
            raise ConfigError(f"open_endpoints holds {', '.join(unknown)}; expected some of "
                              f"{', '.join(OPENABLE_ENDPOINTS)}")
        if self.allowed_hosts is None:
            extra = () if self.host in LOOPBACK_NAMES or self.host in ("0.0.0.0", "::") else (self.host.lower(),)
            object.__setattr__(self, "allowed_hosts", (*LOOPBACK_NAMES, *extra))
        elif not self.allowed_hosts or not all(isinstance(h, str) and h.strip() for h in self.allowed_hosts):
            raise ConfigError(f"allowed_hosts is {self.allowed_hosts!r}; expected Host names, or ('*',) for any")
        else:
            names = tuple(h.strip().lower().strip("[]") for h in self.allowed_hosts)
            object.__setattr__(self, "allowed_hosts", names if names == ("*",) else tuple(dict.fromkeys(
                (*LOOPBACK_NAMES, *names))))
