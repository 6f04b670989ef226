"""Writes that never leave half a file: a temporary name in the same folder, flushed, then renamed."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` through a hidden temporary file in the same folder and a rename, so a reader
    (or an interrupted run) sees the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
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
