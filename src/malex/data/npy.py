""".npy headers read without trusting them: the size a header claims is checked against the bytes that follow
before NumPy allocates anything, so a forged shape is a one-line `DataFileError`, not a MemoryError."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from malex.errors import DataFileError

MAGIC = b"\x93NUMPY"


@dataclass(frozen=True)
class NpyHeader:
    """What an .npy header declares, and where its data starts."""

    shape: tuple[int, ...]
    fortran_order: bool
    dtype: np.dtype
    offset: int  # bytes from the start of the .npy data to its first array byte

    @property
    def nbytes(self) -> int:
        """The bytes of array data the header claims."""
        return math.prod(self.shape) * self.dtype.itemsize


def read_npy_header(stream: BinaryIO, source: str) -> NpyHeader:
    """The header at the start of `stream` (version 1.0 or 2.0), or `DataFileError` naming `source`."""
    if stream.read(len(MAGIC)) != MAGIC:
        raise DataFileError(f"{source}: not an .npy array (no \\x93NUMPY magic); expected the bytes numpy.save writes")
    try:
        version = stream.read(2)
        if version not in (b"\x01\x00", b"\x02\x00"):
            raise ValueError(f"format version {tuple(version)}; expected 1.0 or 2.0")
        read = np.lib.format.read_array_header_1_0 if version == b"\x01\x00" else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read(stream)
    except Exception as exc:  # a corrupt header raises many kinds of errors inside NumPy
        raise DataFileError(f"{source}: the .npy header is unreadable ({' '.join(str(exc).split())})") from exc
    return NpyHeader(tuple(int(d) for d in shape), bool(fortran_order), dtype, stream.tell())


def check_claimed_size(header: NpyHeader, available: int, source: str, *, exact: bool = False) -> None:
    """`DataFileError` when the header claims more array bytes than the `available` ones after it (or, with
    `exact`, any other number). Arrays of Python objects are left to NumPy, which refuses them without pickle."""
    if header.dtype.hasobject:
        return
    if available < header.nbytes or (exact and available != header.nbytes):
        raise DataFileError(f"{source}: the .npy header claims shape {header.shape} of {header.dtype} "
                            f"({header.nbytes} bytes) but {available} bytes follow; the file is truncated or "
                            "its header is forged")


def npy_from_bytes(data: bytes, source: str) -> np.ndarray:
    """The array in .npy bytes (no pickle), after checking that exactly the claimed bytes follow the header."""
    header = read_npy_header(io.BytesIO(data), source)
    check_claimed_size(header, len(data) - header.offset, source, exact=True)
    if header.dtype.hasobject:
        raise DataFileError(f"{source}: the .npy array holds Python objects (dtype {header.dtype}); "
                            "expected numbers, readable without pickle")
    flat = np.frombuffer(data, dtype=header.dtype, count=math.prod(header.shape), offset=header.offset)
    return flat.reshape(header.shape, order="F" if header.fortran_order else "C").copy()
