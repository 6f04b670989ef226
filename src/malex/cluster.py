"""Ray, imported only when a command asks for it: a one-line error naming the extra when it is not installed,
and joining a cluster or starting a private instance on this machine."""

from __future__ import annotations

from malex.errors import ConfigError, MalexError

#: object store of a Ray instance malex starts itself: work travels as names and small summaries
LOCAL_OBJECT_STORE_BYTES = 256 * 1024 * 1024


def import_ray():
    """Ray (with Ray Data), or a one-line `ConfigError` naming the extra that brings it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"--ray needs Ray, which is not installed ({exc}); install malex's ray extra: "
                          "pip install 'malex[ray]'") from exc
    return ray


def check_workers(workers: int, option: str) -> int:
    """`workers` when it is an int >= 1, else a `ConfigError` naming `option`."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"{option} {workers!r}; expected an int >= 1")
    return workers


def start_ray(ray, address: str, cpus: int) -> bool:
    """Connect to the cluster at `address` ('auto': the one this machine belongs to, or 'ray://HOST:PORT'), or
    with 'local' start a private Ray instance of `cpus` CPUs on this machine (no dashboard). True when this call
    started or connected it (the caller shuts it down), False when the process was already connected."""
    if ray.is_initialized():
        return False
    if address == "local":
        ray.init(num_cpus=cpus, include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                 log_to_driver=False, logging_level="WARNING")
    else:
        ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    return True


def malex_cause(exc: BaseException) -> MalexError | None:
    """The MalexError a Ray worker raised, inside the exceptions Ray wraps it in (None if there is none)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, MalexError):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None
