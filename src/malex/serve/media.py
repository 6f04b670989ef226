"""The content types a screening or prediction request may carry, and reading a Content-Type header."""

from __future__ import annotations

from malex.serve.errors import RequestError

NPY_TYPES = ("application/x-npy", "application/octet-stream")
IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG"}
JSON_TYPE = "application/json"
#: every content type a screening or prediction request may carry
CONTENT_TYPES = (*NPY_TYPES, *IMAGE_TYPES, JSON_TYPE)


def media_type(header: str | None) -> str:
    """The media type of a Content-Type header, without parameters, lower case ('' when absent)."""
    return (header or "").split(";", 1)[0].strip().lower()


def check_content_type(header: str | None) -> str:
    """The request's media type, or a 415 when the service does not read it."""
    kind = media_type(header)
    if kind not in CONTENT_TYPES:
        raise RequestError(415, "unsupported_media_type", f"content type {kind or '(none)'!r} is not accepted; "
                           f"expected one of {', '.join(CONTENT_TYPES)}")
    return kind
