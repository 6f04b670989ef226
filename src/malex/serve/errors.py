"""Errors the service answers with: an HTTP status, a short code and a message saying what was wrong."""

from __future__ import annotations

import json

from malex.errors import InputError, MalexError

#: status -> code for the errors that Starlette itself raises (unknown path, wrong method, ...)
HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large",
              415: "unsupported_media_type", 422: "invalid_parameter", 503: "overloaded"}

#: the status nginx logs for a client that closed its connection before the answer (never sent: nobody listens)
CLIENT_CLOSED = 499


def error_document(status: int, code: str, message: str) -> dict:
    """The JSON body of every error: `{"status", "code", "message"}`."""
    return {"status": status, "code": code, "message": message}


def raw_error_response(status: int, reason: str, code: str, message: str, headers: dict | None = None) -> bytes:
    """A complete HTTP/1.1 error response with a JSON body that closes the connection, as bytes (for the
    protocol layer, which answers before or instead of the app)."""
    body = json.dumps(error_document(status, code, message)).encode()
    lines = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(body)}",
             "connection: close", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class ServiceError(MalexError):
    """An error the service answers with `status`, a stable short `code` and `message`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class RequestError(ServiceError, InputError):
    """A request the service refuses (a 4xx): bad body, content type, shape, dtype or values."""


class ClientAborted(ServiceError):
    """The client closed its connection before its request was read: not the service's fault, not a 500."""

    def __init__(self, message: str) -> None:
        super().__init__(CLIENT_CLOSED, "client_closed_request", message)


class Overloaded(ServiceError):
    """The queue of waiting inputs is full (503); the client should retry later."""

    def __init__(self, message: str) -> None:
        super().__init__(503, "overloaded", message)
