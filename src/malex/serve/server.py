"""Running the app with uvicorn: in the foreground (the CLI) or in a background thread (tests, notebooks)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Callable

import uvicorn

from malex.errors import ConfigError
from malex.serve.config import ServeConfig
from malex.serve.protocol import LimitedH11Protocol


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, or a ConfigError saying why it cannot be."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        # IPPROTO_TCP explicitly: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on connections of a
        # socket whose proto says TCP; with proto 0 every keep-alive response waited ~40 ms for a delayed ACK
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port} ({exc}); expected a local address") from exc
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port") from exc
    return sock


def uvicorn_config(app, log_level: str) -> uvicorn.Config:
    """uvicorn's settings for an app of `create_app`: its timeouts, connection cap and shutdown grace."""
    config: ServeConfig = app.state.config
    return uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_keep_alive=config.keep_alive_s,
                          timeout_graceful_shutdown=config.shutdown_grace_s,
                          http=LimitedH11Protocol.factory(config.request_read_s, config.max_connections))


def run_server(app, port: int = 8000, log_level: str = "info",
               announce: Callable[[str], None] | None = None) -> None:
    """Serve `app` on its config's host, at `port`, until SIGINT or SIGTERM (which answer the requests already
    received first); a port that cannot be bound is a ConfigError. `announce(url)` is called once bound."""
    host = app.state.config.host
    sock = _bind(host, port)
    if announce is not None:
        announce(f"http://{host}:{sock.getsockname()[1]}")
    uvicorn.Server(uvicorn_config(app, log_level)).run(sockets=[sock])


class BackgroundServer:
    """`with BackgroundServer(app) as server:` serves `app` on a free port of its config's host (loopback by
    default) at `server.url`."""

    def __init__(self, app, port: int = 0, log_level: str = "warning", start_timeout: float = 30.0) -> None:
        self.app, self.host, self.port, self.start_timeout = app, app.state.config.host, port, start_timeout
        self._server = uvicorn.Server(uvicorn_config(app, log_level))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> BackgroundServer:
        """Bind the port, start serving in a daemon thread, and wait until the app has started."""
        sock = _bind(self.host, self.port)
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True,
                                        name=f"malex-serve-{self.port}")
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ConfigError(f"the service did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Ask the server to finish its requests and exit; wait for the thread."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
            self._thread = None

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
