"""Errors the service answers with: an HTTP status, a short code and a message saying what was wrong."""

from __future__ import annotations

from malex.errors import InputError, MalexError

#: status -> code for the errors that Starlette itself raises (unknown path, wrong method, ...)
HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large",
              415: "unsupported_media_type", 422: "invalid_parameter", 503: "overloaded"}


class ServiceError(MalexError):
    """An error the service answers with `status`, a stable short `code` and `message`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class RequestError(ServiceError, InputError):
    """A request the service refuses (a 4xx): bad body, content type, shape, dtype or values."""


class Overloaded(ServiceError):
    """The queue of waiting inputs is full (503); the client should retry later."""

    def __init__(self, message: str) -> None:
        super().__init__(503, "overloaded", message)
