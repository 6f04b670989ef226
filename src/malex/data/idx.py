"""MNIST's IDX files (plain or gzipped), read with every header field checked.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of dimensions), one
big-endian uint32 per dimension, then the values in row-major order, big-endian. The distribution
names MNIST's four files `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`
and `t10k-labels-idx1-ubyte`, each usually gzipped (`.gz`); Fashion-MNIST uses the same names.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from malex.errors import DataFileError

#: IDX type code -> big-endian NumPy dtype
IDX_TYPES: dict[int, str] = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
#: the most dimensions an IDX file may declare here (MNIST uses 1 and 3)
MAX_DIMS = 8
#: file-name stems of the four MNIST files, by role
MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
GZIP_MAGIC = b"\x1f\x8b"
CHUNK = 1 << 22


def _read_bytes(path: Path, limit: int) -> bytes:
    """At most `limit` bytes of the file's content, gunzipped when it starts with the gzip magic.

    Read in chunks, so that a header declaring an absurd size costs no more memory than the file holds.
    """
    try:
        with path.open("rb") as raw:
            gzipped = raw.read(2) == GZIP_MAGIC
        with (gzip.open(path, "rb") if gzipped else path.open("rb")) as handle:
            chunks, total = [], 0
            while total < limit:
                chunk = handle.read(min(CHUNK, limit - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
            return b"".join(chunks)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataFileError(f"{path}: unreadable ({exc}); expected an IDX file, plain or gzipped") from exc


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in an IDX file (gzipped or not), in native byte order.

    Raises `DataFileError` naming the file when it is missing, is not IDX (bad magic number or type
    code), or holds fewer or more values than its header declares (a truncated or padded file).
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"{path}: no such file; expected an IDX file such as train-images-idx3-ubyte[.gz]")
    head = _read_bytes(path, 4 + 4 * MAX_DIMS)
    if len(head) < 4 or head[0] != 0 or head[1] != 0:
        raise DataFileError(f"{path}: magic number {head[:4].hex() or 'missing'}; expected an IDX file "
                            "(0x0000, a type code, the number of dimensions)")
    code, ndim = head[2], head[3]
    if code not in IDX_TYPES:
        raise DataFileError(f"{path}: IDX type code 0x{code:02x}; expected one of "
                            f"{', '.join(f'0x{c:02x}' for c in IDX_TYPES)}")
    if not 1 <= ndim <= MAX_DIMS:
        raise DataFileError(f"{path}: IDX header declares {ndim} dimensions; expected 1 to {MAX_DIMS}")
    offset = 4 + 4 * ndim
    if len(head) < offset:
        raise DataFileError(f"{path}: truncated inside the IDX header ({len(head)} bytes; expected {offset})")
    dims = tuple(int(d) for d in np.frombuffer(head[4:offset], dtype=">u4"))
    dtype = np.dtype(IDX_TYPES[code])
    expected = offset + int(np.prod(dims, dtype=object)) * dtype.itemsize
    data = _read_bytes(path, expected + 1)  # one byte more than declared reveals trailing data
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "longer than its header declares"
        raise DataFileError(f"{path}: {state}: the header declares shape {dims} of {dtype.name}, "
                            f"{expected} bytes in all; the file holds {len(data)}")
    values = np.frombuffer(data, dtype=dtype, offset=offset).reshape(dims)
    return values.astype(dtype.newbyteorder("="))


def find_idx_file(folder: Path, stem: str) -> Path | None:
    """The file in `folder` for MNIST stem `stem` (e.g. train-images-idx3-ubyte), gzipped or plain, also
    under the common variant name with a dot (train-images.idx3-ubyte); None when there is none."""
    variants = (stem, stem.replace("-idx", ".idx"))
    for name in variants:
        for candidate in (folder / f"{name}.gz", folder / name):
            if candidate.is_file():
                return candidate
    return None


def is_mnist_folder(folder: Path) -> bool:
    """Whether `folder` holds at least one of MNIST's IDX files."""
    return folder.is_dir() and any(find_idx_file(folder, stem) for stem in MNIST_FILES.values())


def read_mnist_folder(folder: str | Path) -> dict[str, np.ndarray]:
    """x_train, y_train, x_test, y_test (uint8 NHWC images, int64 labels) from MNIST's four IDX files."""
    folder = Path(folder)
    found = {role: find_idx_file(folder, stem) for role, stem in MNIST_FILES.items()}
    missing = [MNIST_FILES[role] for role, path in found.items() if path is None]
    if missing:
        raise DataFileError(f"{folder}: missing {', '.join(missing)} (plain or .gz); expected MNIST's four IDX files")
    arrays: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        xpath, ypath = found[f"x_{split}"], found[f"y_{split}"]
        x, y = read_idx(xpath), read_idx(ypath)
        if x.dtype != np.uint8 or x.ndim != 3:
            raise DataFileError(f"{xpath}: holds {x.dtype.name} of shape {x.shape}; expected uint8 images (N, H, W)")
        if y.dtype != np.uint8 or y.ndim != 1:
            raise DataFileError(f"{ypath}: holds {y.dtype.name} of shape {y.shape}; expected uint8 labels (N,)")
        if x.shape[0] != y.shape[0]:
            raise DataFileError(f"{xpath} holds {x.shape[0]} images but {ypath} holds {y.shape[0]} labels; "
                                "expected one label per image")
        arrays[f"x_{split}"] = x[..., None]
        arrays[f"y_{split}"] = y.astype(np.int64)
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise DataFileError(f"{folder}: train images are {arrays['x_train'].shape[1:3]} but test images are "
                            f"{arrays['x_test'].shape[1:3]}; expected one size")
    return arrays
