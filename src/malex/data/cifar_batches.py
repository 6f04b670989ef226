"""CIFAR-10's "python version": pickled batches, read without executing anything from the file.

The distribution (`cifar-10-python.tar.gz`, folder `cifar-10-batches-py/`) holds `data_batch_1` to
`data_batch_5` (10,000 training images each), `test_batch` (10,000) and `batches.meta`. Each batch is a
Python 2 pickle (protocol 2) of a dict with byte-string keys: `data` is a uint8 array of shape
(10000, 3072) whose rows hold one 32x32 image channel-major (1,024 red, then green, then blue values,
each row-major), `labels` a list of class ids 0..9, plus `batch_label` and `filenames`.

A pickle can name any importable callable and have it called, so these files are read by an unpickler
that resolves only the few names a NumPy array needs (its reconstructor, `ndarray`, `dtype`) and, for
batches re-pickled by Python 3 at protocol 2, a latin-1-only `_codecs.encode` (how protocol 2 spells a
bytes object). Any other name, and anything else wrong with the file, raises `DataFileError`.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np

from malex.errors import DataFileError

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
FOLDER = "cifar-10-batches-py"
IMAGE_SHAPE = (3, 32, 32)
NUM_CLASSES = 10
#: a batch of the distribution is about 31 MB; refuse to read anything much larger into memory
MAX_BATCH_BYTES = 256 * 1024 * 1024

_reconstruct = np.ndarray.__reduce__(np.zeros(0))[0]  # NumPy's array reconstructor, whatever its module


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as Python 3 pickles bytes at protocol 2, restricted to that use."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with {type(text).__name__} and {encoding!r}; "
                                     "only latin-1 encoding of a string is allowed")
    return text.encode("latin1")


ALLOWED_GLOBALS: dict[tuple[str, str], Callable[..., Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only `ALLOWED_GLOBALS`; imports nothing."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"the pickle refers to {module}.{name}, which a CIFAR-10 batch never "
                                         "does; refused without loading it") from None


def unpickle_restricted(data: bytes, source: str) -> Any:
    """The object pickled in `data`, built from plain values and NumPy arrays only (keys of Python 2
    byte strings stay bytes). Raises `DataFileError` naming `source` for anything else."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # untrusted bytes: every failure of the unpickler means a bad file
        raise DataFileError(f"{source}: not a CIFAR-10 python batch ({type(exc).__name__}: {exc})") from exc


def _as_text(key: Any) -> Any:
    return key.decode("latin1") if isinstance(key, bytes) else key


def parse_batch(obj: Any, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 32, 32, 3) uint8 NHWC and int64 labels from an unpickled batch dict, every field checked."""
    if not isinstance(obj, dict):
        raise DataFileError(f"{source}: holds a {type(obj).__name__}; expected a dict with 'data' and 'labels'")
    batch = {_as_text(k): v for k, v in obj.items()}
    missing = [k for k in ("data", "labels") if k not in batch]
    if missing:
        found = ", ".join(sorted(str(k) for k in batch)) or "none"
        raise DataFileError(f"{source}: missing {', '.join(missing)} (keys found: {found}); expected a CIFAR-10 batch")
    data = batch["data"]
    width = int(np.prod(IMAGE_SHAPE))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != width:
        what = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataFileError(f"{source}: 'data' is a {what}; expected uint8 of shape (N, {width})")
    labels = batch["labels"]
    if not isinstance(labels, (list, np.ndarray)):
        raise DataFileError(f"{source}: 'labels' is a {type(labels).__name__}; expected a list of class ids")
    if isinstance(labels, list) and not all(type(v) is int for v in labels):
        raise DataFileError(f"{source}: 'labels' holds values other than integers; expected class ids 0..9")
    y = np.asarray(labels)
    if y.ndim != 1 or (y.size and y.dtype.kind not in "iu"):
        raise DataFileError(f"{source}: 'labels' has dtype {y.dtype} and shape {y.shape}; expected class ids (N,)")
    if y.shape[0] != data.shape[0]:
        raise DataFileError(f"{source}: {data.shape[0]} images but {y.shape[0]} labels; expected one label per image")
    if y.size and (int(y.min()) < 0 or int(y.max()) >= NUM_CLASSES):
        raise DataFileError(f"{source}: labels span {int(y.min())}..{int(y.max())}; expected 0..{NUM_CLASSES - 1}")
    images = data.reshape(-1, *IMAGE_SHAPE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), y.astype(np.int64)


def parse_meta(obj: Any, source: str) -> tuple[str, ...]:
    """The class names in an unpickled `batches.meta`."""
    names = obj.get(b"label_names", obj.get("label_names")) if isinstance(obj, dict) else None
    if not isinstance(names, list) or len(names) != NUM_CLASSES or not all(isinstance(n, (bytes, str)) for n in names):
        raise DataFileError(f"{source}: no list of {NUM_CLASSES} 'label_names'; expected CIFAR-10's batches.meta")
    return tuple(_as_text(n) for n in names)


def _read_limited(handle: io.BufferedIOBase, source: str) -> bytes:
    data = handle.read(MAX_BATCH_BYTES + 1)
    if len(data) > MAX_BATCH_BYTES:
        raise DataFileError(f"{source}: larger than {MAX_BATCH_BYTES} bytes; a CIFAR-10 batch is about 31 MB")
    return data


def batch_folder(path: Path) -> Path:
    """`path` itself, or its `cifar-10-batches-py` subfolder when it has one (the archive's root)."""
    return path / FOLDER if (path / FOLDER).is_dir() else path


def is_cifar_folder(path: Path) -> bool:
    """Whether `path` (or its cifar-10-batches-py subfolder) holds any CIFAR-10 batch file."""
    folder = batch_folder(path)
    return folder.is_dir() and any((folder / n).is_file() for n in TRAIN_BATCHES + (TEST_BATCH,))


def _assemble(read: Callable[[str], bytes | None], where: str) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    names = TRAIN_BATCHES + (TEST_BATCH,)
    blobs = {n: read(n) for n in names}
    missing = [n for n in names if blobs[n] is None]
    if missing:
        raise DataFileError(f"{where}: missing {', '.join(missing)}; expected CIFAR-10's python batches "
                            f"{', '.join(names)}")
    parts = {n: parse_batch(unpickle_restricted(blobs[n], f"{where}/{n}"), f"{where}/{n}") for n in names}
    meta = read(META)
    class_names = parse_meta(unpickle_restricted(meta, f"{where}/{META}"), f"{where}/{META}") if meta else ()
    arrays = {
        "x_train": np.concatenate([parts[n][0] for n in TRAIN_BATCHES]),
        "y_train": np.concatenate([parts[n][1] for n in TRAIN_BATCHES]),
        "x_test": parts[TEST_BATCH][0],
        "y_test": parts[TEST_BATCH][1],
    }
    return arrays, class_names


def read_cifar_folder(path: str | Path) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """x_train, y_train, x_test, y_test (uint8 NHWC, int64) and the class names (empty without
    batches.meta) from a `cifar-10-batches-py` folder, or a folder that contains one."""
    folder = batch_folder(Path(path))

    def read(name: str) -> bytes | None:
        file = folder / name
        if not file.is_file():
            return None
        try:
            with file.open("rb") as handle:
                return _read_limited(handle, str(file))
        except OSError as exc:
            raise DataFileError(f"{file}: unreadable ({exc})") from exc

    return _assemble(read, str(folder))


def read_cifar_archive(path: str | Path) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """As `read_cifar_folder`, from the distribution's `cifar-10-python.tar.gz` (nothing is extracted to disk)."""
    path = Path(path)
    try:
        with tarfile.open(path, "r:*") as archive:
            members = {Path(m.name).name: m for m in archive.getmembers() if m.isfile()}

            def read(name: str) -> bytes | None:
                member = members.get(name)
                if member is None:
                    return None
                handle = archive.extractfile(member)
                return None if handle is None else _read_limited(handle, f"{path}:{member.name}")

            return _assemble(read, str(path))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataFileError(f"{path}: unreadable archive ({exc}); expected cifar-10-python.tar.gz") from exc
