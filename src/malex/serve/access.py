"""Who may ask: the Host header allow-list (against DNS rebinding) and the optional API key.

`AccessMiddleware` refuses, before any routing or body reading, a request whose Host header names no
allowed host (400 `invalid_host`) and, when an API key is set, one that does not carry it (401
`unauthorized`), except for the endpoints left open. Keys are compared in constant time.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from starlette.responses import JSONResponse

from malex.errors import ConfigError
from malex.serve.config import ServeConfig
from malex.serve.errors import error_document


def read_api_key(path: Path) -> str:
    """The API key in a file (its first line, without surrounding whitespace)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the API key file {path} ({exc}); expected a text file holding the key") from exc
    lines = text.strip().splitlines()
    if not lines or not lines[0].strip():
        raise ConfigError(f"the API key file {path} is empty; expected the key on its first line")
    return lines[0].strip()


def host_name(header: str | None) -> str | None:
    """The host of a Host header without its port, lower case: 'a.b:80' -> 'a.b', '[::1]:8000' -> '::1'."""
    if not header:
        return None
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def presented_key(headers: dict[bytes, bytes]) -> bytes | None:
    """The key a request carries: `Authorization: Bearer KEY` or `X-API-Key: KEY`."""
    auth = headers.get(b"authorization", b"")
    scheme, _, token = auth.partition(b" ")
    if scheme.lower() == b"bearer" and token.strip():
        return token.strip()
    return headers.get(b"x-api-key")


class AccessMiddleware:
    """ASGI middleware: the Host allow-list, then the API key (when the config sets one)."""

    def __init__(self, app, config: ServeConfig) -> None:
        self.app = app
        self.any_host = config.allowed_hosts == ("*",)
        self.hosts = frozenset(config.allowed_hosts or ())
        self.key = config.api_key.encode() if config.api_key is not None else None
        self.open = frozenset(config.open_endpoints)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        refusal = self._refusal(scope, headers)
        if refusal is None:
            await self.app(scope, receive, send)
        else:
            await refusal(scope, receive, send)

    def _refusal(self, scope, headers: dict[bytes, bytes]) -> JSONResponse | None:
        raw_host = headers.get(b"host", b"").decode("latin-1")
        host = host_name(raw_host)
        if not self.any_host and host not in self.hosts:
            allowed = ", ".join(sorted(self.hosts))
            return JSONResponse(error_document(400, "invalid_host", f"the Host header is {raw_host or '(none)'!r}; "
                                               f"expected one of {allowed} (with any port)"), status_code=400)
        if self.key is None or scope["path"] in self.open:
            return None
        key = presented_key(headers)
        if key is None or not hmac.compare_digest(key, self.key):
            what = "a wrong API key" if key is not None else "no API key"
            return JSONResponse(error_document(401, "unauthorized", f"the request carries {what}; expected "
                                               "'Authorization: Bearer KEY' or 'X-API-Key: KEY'"),
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return None
