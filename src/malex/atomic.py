"""Writes that never leave half a file: a temporary name in the same folder, flushed, then renamed."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes


def check_folder(folder: str | Path, *, create: bool = True) -> Path:
    """Refuse, before any work, a folder that files cannot be written in: raise `FileNotFoundError` when it is
    missing and not `create`, `NotADirectoryError` when it or its nearest existing ancestor is a file, and
    `PermissionError` when that ancestor is not writable. Creates nothing."""
    folder = Path(folder)
    existing = folder
    while not existing.exists():
        if not create:
            raise FileNotFoundError(f"folder {folder} does not exist; expected an existing folder")
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{existing} is not a folder (it is a file); expected a folder to write in")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"folder {existing} is not writable; expected a folder this user may write in")
    return folder


def check_output(path: str | Path, *, overwrite: bool = False, create_folder: bool = True) -> Path:
    """Refuse, before any work, an output file that could not be written: a folder at `path`, an existing file
    unless `overwrite` (`FileExistsError`), or a folder as in `check_folder`."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; expected a file path to write")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --force) to replace it")
    check_folder(path.parent, create=create_folder)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` through a hidden temporary file in the same folder and a rename, so a reader
    (or an interrupted run) sees the old file or the new one, never a part. A temporary file left by a killed
    save is removed first, with a warning naming it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    if tmp.is_file() or tmp.is_symlink():
        tmp.unlink()
        warnings.warn(f"removed {tmp}, left by an interrupted save of {path}", UserWarning, stacklevel=2)
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Named tensors (copied, so that views of one storage save apart) and string metadata as one safetensors file, atomically."""
    plain = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    return atomic_write_bytes(path, safetensors_bytes(plain, metadata=metadata))
