"""Reading NumPy files safely (no pickle), whatever their suffix claims."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from malex.data.npy import MAGIC, check_claimed_size, read_npy_header
from malex.errors import DataFileError

#: the largest expansion deflate can achieve (RFC 1951: 258-byte matches in codes of about 2 bits)
DEFLATE_MAX_RATIO = 1032


def check_claimed_sizes(path: Path) -> None:
    """Refuse an .npy file, or an .npz member, whose header claims more bytes than it holds, before NumPy
    allocates them (`DataFileError`). Other content is left to `np.load` to accept or refuse."""
    with open(path, "rb") as handle:
        start = handle.read(len(MAGIC))
        handle.seek(0)
        if start == MAGIC:
            header = read_npy_header(handle, str(path))
            check_claimed_size(header, path.stat().st_size - header.offset, str(path))
            return
    if not start.startswith(b"PK\x03\x04"):
        return
    with zipfile.ZipFile(path) as archive:
        for member in archive.infolist():
            if member.filename.endswith(".npy"):
                where = f"{path} member {member.filename}"
                with archive.open(member) as stream:
                    header = read_npy_header(stream, where)
                check_claimed_size(header, _member_size(member) - header.offset, where)


def _member_size(member: zipfile.ZipInfo) -> int:
    """The most bytes a zip member can hold: its recorded size, capped by what its compressed bytes can expand
    to (stored: as many; deflate: at most 1032 times as many), so a forged size in the zip directory cannot
    vouch for a forged .npy header."""
    if member.compress_type == zipfile.ZIP_STORED:
        return min(member.file_size, member.compress_size)
    if member.compress_type == zipfile.ZIP_DEFLATED:
        return min(member.file_size, DEFLATE_MAX_RATIO * member.compress_size + 64)
    return member.file_size


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays in an .npz archive by name, or {"": array} for a single .npy array.

    Raises `DataFileError` naming the file when it is missing, unreadable, needs pickle or claims more data
    than it holds.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"{path}: no such file; expected an .npy array or an .npz archive")
    try:
        check_claimed_sizes(path)
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return {"": loaded}
        with loaded as archive:
            return {k: archive[k] for k in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataFileError(f"{path}: not a readable NumPy file ({exc})") from exc
