"""The inputs of a large scan, read a slice at a time: a file, a folder or a glob of .npy/.npz shards, PNG/JPEG
images or Parquet files. Listing a source reads only headers (row counts), never the images; reading a slice
holds only that slice in memory (.npy and stored .npz members are read at an offset, Parquet by row group)."""

from __future__ import annotations

import glob
import io
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from malex.data.files import check_claimed_sizes
from malex.data.images import IMAGE_SUFFIXES, MAX_PIXELS, decode_image, pillow
from malex.data.inputs import NPZ_IMAGE_KEYS
from malex.data.npy import NpyHeader, read_npy_header
from malex.data.validate import to_nchw_float
from malex.errors import ConfigError, DataFileError, InputError

ARRAY_SUFFIXES = (".npy", ".npz")
PARQUET_SUFFIXES = (".parquet",)
#: Parquet columns tried, in order, for the images (else the first column)
PARQUET_IMAGE_COLUMNS = ("image", "img", "x")


@dataclass(frozen=True)
class Shard:
    """One file of a source: its path, kind ('npy', 'npz', 'parquet' or 'image'), the array or column that
    holds its images ('' for .npy files and images) and how many inputs it holds."""

    path: str
    kind: str
    key: str
    rows: int


def _kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in ARRAY_SUFFIXES:
        return suffix[1:]
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    return "image" if suffix in IMAGE_SUFFIXES else None


def source_files(source: str) -> list[Path]:
    """The files of `source`, in a fixed order: the file itself, every readable file under a folder (sorted by
    relative path, hidden ones skipped), or the matches of a glob pattern (sorted). `DataFileError` when there
    are none."""
    path = Path(source)
    if path.is_file():
        if _kind(path) is None:
            raise DataFileError(f"{source}: not an .npy, .npz, .parquet, PNG or JPEG file")
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p) is not None
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
    elif glob.has_magic(source):
        found = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file()
                       and _kind(Path(p)) is not None)
    else:
        raise DataFileError(f"{source}: no such file or folder; expected a file, a folder or a glob pattern of "
                            ".npy/.npz/.parquet/PNG/JPEG files")
    if not found:
        raise DataFileError(f"{source}: holds no .npy, .npz, .parquet, PNG or JPEG files")
    return found


def _npz_member(archive: zipfile.ZipFile, path: Path) -> str:
    names = [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
    key = next((k for k in NPZ_IMAGE_KEYS if k in names), names[0] if names else None)
    if key is None:
        raise DataFileError(f"{path}: the archive holds no arrays")
    return key


def _header(stream, where: str) -> NpyHeader:
    header = read_npy_header(stream, where)
    if not header.shape:
        raise DataFileError(f"{where}: holds a single number; expected an array of images (N, ...)")
    if header.dtype.hasobject:
        raise DataFileError(f"{where}: the array holds Python objects (dtype {header.dtype}); expected numbers")
    return header


def _parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ConfigError("reading Parquet needs pyarrow, which is not installed; install malex's ray extra "
                          "(pip install 'malex[ray]') or pyarrow") from exc
    return pq


def _parquet_column(schema, path: Path) -> str:
    names = list(schema.names)
    if not names:
        raise DataFileError(f"{path}: the Parquet file has no columns")
    return next((c for c in PARQUET_IMAGE_COLUMNS if c in names), names[0])


def describe_shard(path: Path) -> Shard:
    """A file's kind, image array or column and input count, from its header alone (`DataFileError` when it
    cannot be read)."""
    kind = _kind(path)
    if kind == "image":
        return Shard(str(path), kind, "", 1)
    if kind == "parquet":
        pq = _parquet()
        try:
            meta = pq.ParquetFile(path)
            return Shard(str(path), kind, _parquet_column(meta.schema_arrow, path), meta.metadata.num_rows)
        except OSError as exc:
            raise DataFileError(f"{path}: not a readable Parquet file ({exc})") from exc
    try:
        check_claimed_sizes(path)
        if kind == "npy":
            with open(path, "rb") as handle:
                return Shard(str(path), kind, "", _header(handle, str(path)).shape[0])
        with zipfile.ZipFile(path) as archive:
            key = _npz_member(archive, path)
            with archive.open(key + ".npy") as stream:
                return Shard(str(path), kind, key, _header(stream, f"{path} member {key}").shape[0])
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataFileError(f"{path}: not a readable NumPy file ({exc})") from exc


def list_shards(source: str) -> list[Shard]:
    """Every file of `source` (`source_files`) with its input count."""
    return [describe_shard(p) for p in source_files(source)]


def _array_rows(stream, header: NpyHeader, start: int, stop: int, where: str) -> np.ndarray:
    """Rows [start, stop) of the C-ordered array whose header `stream` has just been read past."""
    if header.fortran_order:
        raise DataFileError(f"{where}: a Fortran-ordered array cannot be read a slice at a time; save it in C order")
    row = math.prod(header.shape[1:]) * header.dtype.itemsize
    stream.seek(header.offset + start * row)
    data = stream.read((stop - start) * row)
    if len(data) != (stop - start) * row:
        raise DataFileError(f"{where}: truncated; rows {start}..{stop} are not all there")
    return np.frombuffer(data, dtype=header.dtype).reshape((stop - start, *header.shape[1:])).copy()


def _parquet_rows(shard: Shard, start: int, stop: int):
    """The image column's rows [start, stop) as one Arrow array, reading only the row groups that hold them."""
    import pyarrow as pa

    handle = _parquet().ParquetFile(shard.path)
    chunks, first = [], 0
    for group in range(handle.num_row_groups):
        count = handle.metadata.row_group(group).num_rows
        if first < stop and first + count > start:
            column = handle.read_row_group(group, columns=[shard.key]).column(0)
            chunks.append(column.slice(max(start - first, 0), min(stop, first + count) - max(start, first)))
        first += count
    return pa.chunked_array([c for chunk in chunks for c in chunk.chunks], type=chunks[0].type).combine_chunks()


def _from_parquet_values(values, shard: Shard, shape: tuple[int, int, int], where: str, resize: bool) -> np.ndarray:
    """(N, C, H, W) or (N, H, W[, C]) images from an Arrow array of encoded images (binary, or Hugging Face
    datasets' {bytes, path} structs) or of numbers per image (nested lists, or flat C*H*W); whole numbers in
    0..255 are 8-bit pixels."""
    import pyarrow as pa

    kind = values.type
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        values, kind = values.field("bytes"), kind.field("bytes").type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        image = pillow()
        return np.stack([decode_image(image, io.BytesIO(v.as_py()), f"{where} row {start_row}", shape[0],
                                      tuple(shape[1:]), resize, MAX_PIXELS, "the model's size")
                         for start_row, v in enumerate(values)])
    dims = []
    while pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        dims.append(values)
        values, kind = values.flatten(), kind.value_type
    if not dims or not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
        raise DataFileError(f"{where}: column {shard.key} is {values.type}; expected encoded PNG/JPEG bytes or "
                            "lists of numbers")
    flat = np.array(values.to_numpy(zero_copy_only=False))  # a writable copy (Arrow buffers are read-only)
    n = len(dims[0])
    sizes = [len(dims[i + 1]) // max(len(dims[i]), 1) for i in range(len(dims) - 1)] + [len(values) // max(len(dims[-1]), 1)]
    if n == 0 or math.prod(sizes) * n != flat.size:
        raise DataFileError(f"{where}: column {shard.key} holds images of different sizes")
    if pa.types.is_integer(kind):
        if flat.min() < 0 or flat.max() > 255:
            raise InputError(f"{where}: integer pixels span {flat.min()}..{flat.max()}; expected 0..255")
        flat = flat.astype(np.uint8)
    if len(sizes) > 1:  # nested: the image's own layout, (H, W), (C, H, W) or (H, W, C)
        return flat.reshape((n, *sizes))
    if sizes[0] != math.prod(shape):
        raise InputError(f"{where}: {sizes[0]} numbers per image; expected {math.prod(shape)} "
                         f"(C, H, W = {', '.join(map(str, shape))}, flattened in that order)")
    return flat.reshape((n, *shape))


def read_rows(shard: Shard, start: int, stop: int, shape: tuple[int, int, int], resize: bool = False) -> torch.Tensor:
    """Inputs [start, stop) of `shard` as float32 NCHW in [0, 1], validated for a model taking `shape` (C, H, W);
    encoded images of another size are resized to it when `resize`, else refused."""
    where = f"{shard.path} rows {start}..{stop}"
    if not 0 <= start < stop <= shard.rows:
        raise ConfigError(f"{where}: outside the shard's {shard.rows} rows")
    if shard.kind == "parquet":
        array = _from_parquet_values(_parquet_rows(shard, start, stop), shard, shape, where, resize)
        return to_nchw_float(array, shape=shape, channels=shape[0], source=where)
    if shard.kind == "npy":
        with open(shard.path, "rb") as handle:
            array = _array_rows(handle, _header(handle, shard.path), start, stop, where)
    elif shard.kind == "npz":
        with zipfile.ZipFile(shard.path) as archive, archive.open(shard.key + ".npy") as stream:
            array = _array_rows(stream, _header(stream, where), start, stop, where)
    else:
        raise ConfigError(f"{shard.path}: an image file is read with read_image_files")
    return to_nchw_float(array, shape=shape, source=where)


def read_image_files(paths: list[str], shape: tuple[int, int, int], resize: bool = False) -> torch.Tensor:
    """PNG/JPEG files as float32 NCHW in [0, 1] for a model taking `shape` (C, H, W): each of its size, or resized
    to it when `resize`."""
    image = pillow()
    arrays = [decode_image(image, Path(p), p, shape[0], tuple(shape[1:]), resize, MAX_PIXELS, "the model's size")
              for p in paths]
    return to_nchw_float(np.stack(arrays), channels=shape[0], source=os.path.commonpath(paths) if paths else None)

