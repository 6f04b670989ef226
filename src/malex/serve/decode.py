"""Request bodies to validated input tensors: .npy bytes, PNG/JPEG images, or JSON arrays.

Every refusal is a `RequestError` with the HTTP status to answer: 400 for a body that cannot be read
(corrupt .npy, image or JSON), 408 for a body that does not arrive in time, 413 for too much (bytes,
inputs, JSON elements, pixels), 415 for a content type the service does not read, 422 for readable
inputs of the wrong shape, dtype or values. A client that leaves mid-upload is `ClientAborted`.
"""

from __future__ import annotations

import asyncio
import io
import json
import math

import numpy as np
import torch

from malex.data.validate import IMAGE_DTYPES, to_nchw_float
from malex.errors import InputError
from malex.serve.errors import ClientAborted, RequestError
from malex.serve.limits import json_element_limits
from malex.serve.media import IMAGE_TYPES, NPY_TYPES, check_content_type

JSON_DTYPES = ("float32", "uint8")
MAX_JSON_DEPTH = 4
#: PIL image modes with 8 bits per channel, converted to the model's grey or RGB layout
_EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "La", "RGBa")

_SHAPES = "one image (C, H, W), (H, W, C) or (H, W), or a batch (N, C, H, W), (N, H, W, C) or (N, H, W)"


def decode_inputs(body: bytes, content_type: str | None, shape: tuple[int, int, int], *, max_batch: int,
                  max_image_pixels: int = 4096 * 4096) -> torch.Tensor:
    """The inputs in `body` as a float32 (N, C, H, W) tensor in [0, 1] for a model taking `shape` images."""
    kind = check_content_type(content_type)
    if not body:
        raise RequestError(400, "empty_body", f"the request body is empty; expected {kind} content")
    if kind in NPY_TYPES:
        array = read_npy(body)
    elif kind in IMAGE_TYPES:
        array = read_image(body, IMAGE_TYPES[kind], shape, max_image_pixels)
    else:
        array = read_json(body, shape, max_batch)
    return to_batch(array, shape, max_batch)


def read_npy(body: bytes) -> np.ndarray:
    """An array from .npy bytes, parsed without pickle and without trusting the header's size."""
    if not body.startswith(b"\x93NUMPY"):
        raise RequestError(400, "corrupt_npy", "the body is not an .npy file (no \\x93NUMPY magic); "
                           "expected the bytes numpy.save writes")
    fp = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            dims, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            dims, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise ValueError(f"format version {version[0]}.{version[1]}; expected 1.0 or 2.0")
    except Exception as exc:  # a corrupt header raises many kinds of errors inside NumPy
        raise RequestError(400, "corrupt_npy", f"the .npy header is unreadable ({exc})") from exc
    if (dtype.newbyteorder("=") if dtype.byteorder in "<>" else dtype) not in IMAGE_DTYPES:
        accepted = ", ".join(str(d) for d in IMAGE_DTYPES)
        raise RequestError(422, "invalid_dtype", f"the .npy array has dtype {dtype}, which the service does not "
                           f"read; expected one of {accepted} (uint8 0..255, floats in [0, 1])")
    need = math.prod(dims) * dtype.itemsize
    data = body[fp.tell():]
    if len(data) != need:
        raise RequestError(400, "corrupt_npy", f"the .npy header declares shape {tuple(dims)} of {dtype} "
                           f"({need} bytes) but {len(data)} bytes follow; the file is truncated or corrupt")
    try:
        flat = np.frombuffer(data, dtype=dtype, count=math.prod(dims))
        return flat.reshape(dims, order="F" if fortran else "C").copy()
    except Exception as exc:
        raise RequestError(400, "corrupt_npy", f"the .npy data cannot be read ({exc})") from exc


def read_image(body: bytes, fmt: str, shape: tuple[int, int, int], max_pixels: int) -> np.ndarray:
    """One (H, W) or (H, W, 3) uint8 image from PNG or JPEG bytes, in the model's channel layout."""
    from PIL import Image, UnidentifiedImageError

    channels, height, width = shape
    if channels not in (1, 3):
        raise RequestError(415, "unsupported_media_type", f"this model takes {channels}-channel inputs, which "
                           "images cannot carry; send .npy or JSON")
    try:
        with Image.open(io.BytesIO(body), formats=[fmt]) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise RequestError(413, "image_too_large", f"the image has {w}x{h} pixels; at most {max_pixels} "
                                   f"are read, and the model takes {width}x{height}")
            if (h, w) != (height, width):
                raise RequestError(422, "invalid_shape", f"the image is {w}x{h} pixels (width x height); "
                                   f"expected {width}x{height}")
            if img.mode not in _EIGHT_BIT_MODES:
                raise RequestError(422, "invalid_dtype", f"the image has mode {img.mode!r} (more than 8 bits per "
                                   "channel); expected an 8-bit grey, RGB, RGBA or palette image")
            return np.array(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    except RequestError:
        raise
    except UnidentifiedImageError as exc:
        raise RequestError(400, "corrupt_image", f"the body is not a readable {fmt} image (its bytes are not "
                           f"recognised as {fmt})") from exc
    except Image.DecompressionBombError as exc:
        raise RequestError(413, "image_too_large", f"the image is too large to decode ({exc})") from exc
    except Exception as exc:  # PIL raises many kinds of errors on corrupt or truncated files
        raise RequestError(400, "corrupt_image", f"the body is not a readable {fmt} image "
                           f"({type(exc).__name__}: {exc})") from exc


def _check_numbers(inputs: list) -> None:
    """Nested lists of numbers only (no booleans, strings, nulls or objects), at most MAX_JSON_DEPTH deep."""
    stack = [(inputs, 1)]
    while stack:
        items, depth = stack.pop()
        for item in items:
            if isinstance(item, list):
                if depth >= MAX_JSON_DEPTH:
                    raise RequestError(422, "invalid_shape", f"inputs are nested more than {MAX_JSON_DEPTH} "
                                       f"levels deep; expected {_SHAPES}")
                stack.append((item, depth + 1))
            elif isinstance(item, bool) or not isinstance(item, (int, float)):
                raise RequestError(422, "invalid_dtype", f"inputs hold a JSON {type(item).__name__} value "
                                   f"({str(item)[:40]!r}); expected only numbers in nested arrays")


def _check_element_counts(body: bytes, shape: tuple[int, int, int], max_batch: int) -> None:
    """Refuse a JSON body that opens more arrays or separates more values than `max_batch` inputs of `shape`
    can hold, from a byte count alone (C speed, before any parsing: `[[],[],...]` costs no Python objects)."""
    numbers, arrays = json_element_limits(shape, max_batch)
    opened = body.count(b"[")
    if opened > arrays:
        raise RequestError(413, "too_many_elements", f"the JSON body opens {opened} arrays; {max_batch} inputs "
                           f"of shape {shape} (the most one request may hold) need at most {arrays}")
    commas = body.count(b",")
    if commas > numbers + arrays + 1:
        raise RequestError(413, "too_many_elements", f"the JSON body separates {commas + 1} values; {max_batch} "
                           f"inputs of shape {shape} hold at most {numbers} numbers in {arrays} arrays")


def read_json(body: bytes, shape: tuple[int, int, int], max_batch: int) -> np.ndarray:
    """An array from a JSON body: nested arrays of numbers, or {"inputs": [...], "dtype": "float32"|"uint8"}.
    A body with more elements than `max_batch` inputs of `shape` hold is refused before it is parsed."""
    _check_element_counts(body, shape, max_batch)
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise RequestError(400, "invalid_json", f"the body is not valid JSON ({exc})") from exc
    dtype = "float32"
    if isinstance(doc, dict):
        unknown = sorted(set(doc) - {"inputs", "dtype"})
        if unknown:
            raise RequestError(422, "invalid_json", f"unknown field(s) {', '.join(map(repr, unknown))}; "
                               "expected 'inputs' and optionally 'dtype'")
        if "inputs" not in doc:
            raise RequestError(422, "invalid_json", "the field 'inputs' is missing; expected "
                               '{"inputs": [...], "dtype": "float32" or "uint8"}')
        dtype = doc.get("dtype", "float32")
        if dtype not in JSON_DTYPES:
            raise RequestError(422, "invalid_dtype", f"dtype is {str(dtype)[:40]!r}; expected 'float32' "
                               "(values in [0, 1]) or 'uint8' (whole numbers 0..255)")
        doc = doc["inputs"]
    if not isinstance(doc, list):
        raise RequestError(422, "invalid_shape", f"inputs are a JSON {type(doc).__name__}; expected nested "
                           f"arrays of numbers: {_SHAPES}")
    _check_numbers(doc)
    try:
        array = np.array(doc, dtype=np.float64)
    except (ValueError, OverflowError, TypeError) as exc:
        raise RequestError(422, "invalid_shape", f"inputs are not a rectangular array of numbers ({exc}); "
                           f"expected {_SHAPES}") from exc
    if dtype == "uint8":
        if array.size and (not np.isfinite(array).all() or (array != np.round(array)).any()
                           or array.min() < 0 or array.max() > 255):
            raise RequestError(422, "invalid_input", "dtype is 'uint8' but inputs hold values other than "
                               "whole numbers 0..255")
        return array.astype(np.uint8)
    return array


def to_batch(array: np.ndarray, shape: tuple[int, int, int], max_batch: int) -> torch.Tensor:
    """One image or a batch as a validated (N, C, H, W) tensor; at most `max_batch` inputs."""
    channels, height, width = shape
    if array.ndim == 2 or array.ndim == 3 and (channels != 1 or array.shape == (height, width, 1)):
        array = array[None]
    elif array.ndim != 3 and array.ndim != 4:
        raise RequestError(422, "invalid_shape", f"inputs have shape {array.shape}; expected {_SHAPES} "
                           f"with (C, H, W) = {shape}")
    if array.shape[0] > max_batch:
        raise RequestError(413, "batch_too_large", f"{array.shape[0]} inputs in one request; at most "
                           f"{max_batch} are accepted")
    try:
        return to_nchw_float(array, shape=shape, source="inputs")
    except InputError as exc:
        raise RequestError(422, "invalid_input", str(exc)) from exc


async def read_body(request, max_bytes: int, timeout_s: float) -> bytes:
    """The body of a Starlette `request`, refused with a 413 as soon as it exceeds `max_bytes`, with a 408
    when it has not all arrived within `timeout_s`; a client that disconnects meanwhile is `ClientAborted`."""
    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
        raise RequestError(413, "body_too_large", f"the body has {int(declared)} bytes; at most {max_bytes} "
                           "are accepted")
    chunks: list[bytes] = []

    async def read() -> None:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise RequestError(413, "body_too_large", f"the body exceeds {max_bytes} bytes; at most "
                                   f"{max_bytes} are accepted")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout_s)
    except ClientDisconnect as exc:
        raise ClientAborted(f"the client closed the connection after sending {sum(map(len, chunks))} bytes "
                            f"of its body ({declared or 'unknown'} declared)") from exc
    except (asyncio.TimeoutError, TimeoutError) as exc:
        raise RequestError(408, "request_timeout", f"the body did not arrive within {timeout_s:g} s "
                           f"({sum(map(len, chunks))} of {declared or 'unknown'} bytes came); expected the whole "
                           "request within the service's request-read timeout") from exc
    return b"".join(chunks)
