"""Hostile requests for the HTTP-service benchmarks: raw bytes on a loopback socket, and what they are answered.

Each case opens its own connection(s), sends what a hostile or broken client would, and reports the
status the service answered (or 'closed' when it closed the connection without an answer). Used by
`serve_fuzz.py` (every case, with server CPU per case) and `serve_load.py --soak` (mixed into the load).
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

HOST = "127.0.0.1"


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def request(method: str, path: str, body: bytes = b"", content_type: str = "application/json",
            headers: dict[str, str] | None = None, host: str = HOST) -> bytes:
    """One HTTP/1.1 request as bytes, with Connection: close."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}", "Connection: close", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def exchange(port: int, data: bytes, *, close_after_send: bool = False, timeout: float = 60.0) -> str:
    """Send `data` on a new connection; the status of the answer, 'closed' or 'timeout'."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except OSError:  # the service closed the connection while we were still sending (a 413 mid-body)
            pass
        if close_after_send:
            return "aborted"
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except socket.timeout:
            return "timeout"
        except OSError:
            pass
    head = b"".join(chunks).split(b"\r\n", 1)[0].split()
    return head[1].decode() if len(head) > 1 else "closed"


@dataclass(frozen=True)
class Case:
    """A hostile request: `run(port, headers)` returns the statuses it got; `repeat` times it for CPU."""

    name: str
    run: Callable[[int, dict], list[str]]
    expected: tuple[str, ...]
    repeat: int = 20


def _simple(body: bytes, content_type: str = "application/json", path: str = "/v1/screen", host: str = HOST,
            close_after_send: bool = False):
    def run(port: int, headers: dict) -> list[str]:
        return [exchange(port, request("POST", path, body, content_type, headers, host), close_after_send=close_after_send)]
    return run


def _raw(data: bytes):
    return lambda port, headers: [exchange(port, data)]


def _headed(content_type: str, framing: str, rest: bytes):
    """A POST /v1/screen whose framing header (Content-Length or Transfer-Encoding) is given, then `rest`."""
    def run(port: int, headers: dict) -> list[str]:
        lines = ["POST /v1/screen HTTP/1.1", f"Host: {HOST}", f"Content-Type: {content_type}", framing,
                 *(f"{k}: {v}" for k, v in headers.items())]
        return [exchange(port, ("\r\n".join(lines) + "\r\n\r\n").encode() + rest)]
    return run


def _abort_mid_upload(port: int, headers: dict) -> list[str]:
    data = request("POST", "/v1/screen", b"\x93NUMPY" + b"\0" * 4000, "application/x-npy", headers)
    head_end = data.index(b"\r\n\r\n") + 4
    return [exchange(port, data[: head_end + 1000], close_after_send=True)]


def _slow_head(port: int, headers: dict) -> list[str]:
    return [exchange(port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")]


def _slow_body(port: int, headers: dict) -> list[str]:
    data = request("POST", "/v1/screen", b"\x93NUMPY" + b"\0" * 4000, "application/x-npy", headers)
    return [exchange(port, data[: data.index(b"\r\n\r\n") + 10])]


def _concurrently(n: int, run: Callable[[int, dict], list[str]]):
    """`n` copies of a case at once, plus a /healthz probe while they run."""
    def many(port: int, headers: dict) -> list[str]:
        out: list[str] = []
        threads = [threading.Thread(target=lambda: out.extend(run(port, headers))) for _ in range(n)]
        for t in threads:
            t.start()
        time.sleep(0.05)
        out.append("healthz " + exchange(port, request("GET", "/healthz")))
        for t in threads:
            t.join()
        return out
    return many


def _idle_connections(n: int):
    """`n` connections that send nothing; how each ends (503 past the cap, closed after the read timeout),
    then /healthz."""
    def run(port: int, headers: dict) -> list[str]:
        socks = [socket.create_connection((HOST, port), timeout=120) for _ in range(n)]
        out = []
        try:
            for s in socks:
                try:
                    head = s.recv(256).split(b"\r\n", 1)[0].split()
                    out.append(head[1].decode() if len(head) > 1 else "closed")
                except OSError:
                    out.append("closed")
        finally:
            for s in socks:
                s.close()
        return [*out, "healthz " + exchange(port, request("GET", "/healthz"))]  # once the service dropped them
    return run


def hostile_cases(shape: tuple[int, int, int]) -> list[Case]:
    """Every hostile case of issue 16 for a model taking `shape` images."""
    image = np.full(shape, 0.5, np.float32)
    big_empty = b"[" + b",".join([b"[]"] * (8 * 1024 * 1024 // 3)) + b"]"
    small_empty = b"[" + b",".join([b"[]"] * 100_000) + b"]"
    return [
        Case("JSON of empty lists, 8 MB", _simple(big_empty), ("413",), 5),
        Case("JSON of empty lists, 300 kB (under the body limit)", _simple(small_empty), ("413",)),
        Case("three 8 MB empty-list bodies at once, /healthz meanwhile", _concurrently(3, _simple(big_empty)),
             ("413", "healthz 200"), 3),
        Case("JSON nested 100000 deep", _simple(b"[" * 100_000 + b"]" * 100_000), ("413",)),
        Case("JSON number of 300000 digits", _simple(b"[" + b"7" * 300_000 + b"]"), ("400", "413")),
        Case("JSON of 200000 zeros", _simple(b"[" + b",".join([b"0"] * 200_000) + b"]"), ("413",)),
        Case("float128 .npy", _simple(npy(np.zeros((2, *shape), np.longdouble)), "application/x-npy"), ("422",)),
        Case("complex .npy", _simple(npy(np.zeros((2, *shape), np.complex64)), "application/x-npy"), ("422",)),
        Case(".npy declaring a huge shape", _simple(npy(image)[:10] + b"{'descr': '<f4', 'fortran_order': False, "
             b"'shape': (999999999, 1, 8, 8), }" + b" " * 40 + b"\n", "application/x-npy"), ("400",)),
        Case("Content-Length of 10 GB", _headed("application/json", "Content-Length: 10000000000", b"[[["), ("413",)),
        Case("chunked body past the limit", _headed("application/x-npy", "Transfer-Encoding: chunked", (
            b"10000\r\n" + b"\0" * 0x10000 + b"\r\n") * 40 + b"0\r\n\r\n"), ("413",), 5),
        Case("disconnect mid-upload", _abort_mid_upload, ("aborted",)),
        Case("malformed request line", _raw(b"GARBAGE GARBAGE\r\n\r\n"), ("400",)),
        Case("malformed header", _raw(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nno colon\r\n\r\n"), ("400",)),
        Case("binary noise", _raw(bytes(range(256)) * 8), ("400",)),
        Case("Host header of another site (DNS rebinding)", _simple(b"[]", host="evil.example"), ("400",)),
        Case("no API key", lambda port, headers: [exchange(port, request("POST", "/v1/screen", b"[]"))], ("401",)),
        Case("request head never finished (slowloris)", _slow_head, ("closed",), 1),
        Case("body never finished", _slow_body, ("408",), 1),
        Case("300 idle connections (cap 256)", _idle_connections(300), ("503", "closed", "healthz 200"), 1),
    ]


def hostile_json(shape: tuple[int, int, int]) -> list[tuple[bytes, str]]:
    """Small hostile bodies (body, content type) for the soak's garbage clients."""
    return [(b"[" + b",".join([b"[]"] * 50_000) + b"]", "application/json"),
            (b"[" * 5000 + b"]" * 5000, "application/json"),
            (json.dumps([[["x"]]]).encode(), "application/json"),
            (npy(np.zeros((1, *shape), np.longdouble)), "application/x-npy"),
            (b"\x93NUMPY garbage", "application/x-npy"),
            (b"\x89PNG broken", "image/png")]
