"""The HTTP service: screens every input of a guarded model (needs the `serve` extra)."""

from malex.serve.app import create_app
from malex.serve.config import ServeConfig
from malex.serve.server import BackgroundServer, run_server

__all__ = ["BackgroundServer", "ServeConfig", "create_app", "run_server"]
