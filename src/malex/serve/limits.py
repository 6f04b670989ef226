"""How large a request may be, derived from the model's input shape and the batch limit.

A body of each content type may hold at most `max_batch` inputs of the model's shape, so its largest
valid size is known before reading it: .npy bytes of float64 (the widest accepted dtype), JSON with room
for pretty-printing, one PNG or JPEG image. A JSON body also has a largest number of arrays and numbers,
which lets the decoder refuse `[[],[],...]` from a count of its brackets instead of parsing it.
"""

from __future__ import annotations

import math

from malex.serve.media import CONTENT_TYPES, IMAGE_TYPES, JSON_TYPE, NPY_TYPES

#: room for an .npy header (NumPy pads it to a multiple of 64 bytes; 4 KiB holds any shape of ours)
NPY_HEADER_BYTES = 4096
#: widest accepted item (float64)
NPY_ITEM_BYTES = 8
#: one JSON number as Python or JavaScript print a float64 ("-1.2345678901234567e-308"), its comma and
#: the indentation of a pretty-printed file
JSON_BYTES_PER_NUMBER = 48
#: one JSON array's brackets, comma, newline and indentation when pretty-printed
JSON_BYTES_PER_ARRAY = 64
#: an image file's headers, tables and metadata (ICC profile, EXIF), beside its pixels
IMAGE_OVERHEAD_BYTES = 1024 * 1024
#: worst-case bytes per pixel of an 8-bit image file that compresses nothing (RGBA, filter bytes, chunks)
IMAGE_BYTES_PER_PIXEL = 16


def json_element_limits(shape: tuple[int, int, int], max_batch: int) -> tuple[int, int]:
    """(numbers, arrays) that a JSON body of at most `max_batch` (C, H, W) inputs holds at most, over every
    layout the service reads: (N, C, H, W), (N, H, W, C), one image, grey (N, H, W)."""
    c, h, w = shape
    numbers = max_batch * c * h * w
    arrays = 1 + max_batch * (1 + max(c + c * h, h + h * w))
    return numbers, arrays


def body_limits(shape: tuple[int, int, int], max_batch: int, max_body_bytes: int | None) -> dict[str, int]:
    """The largest body accepted per content type: `max_body_bytes` for all when given, else what
    `max_batch` inputs of `shape` need in each."""
    if max_body_bytes is not None:
        return dict.fromkeys(CONTENT_TYPES, max_body_bytes)
    numbers, arrays = json_element_limits(shape, max_batch)
    npy = NPY_HEADER_BYTES + numbers * NPY_ITEM_BYTES
    image = IMAGE_OVERHEAD_BYTES + math.prod(shape[1:]) * IMAGE_BYTES_PER_PIXEL
    json_bytes = 4096 + numbers * JSON_BYTES_PER_NUMBER + arrays * JSON_BYTES_PER_ARRAY
    return {**dict.fromkeys(NPY_TYPES, npy), **dict.fromkeys(IMAGE_TYPES, image), JSON_TYPE: json_bytes}
