"""Identify a model by its weights, so that a guard is never used in front of a different model."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def hash_tensors(digest: "hashlib._Hash", tensors: dict[str, torch.Tensor]) -> "hashlib._Hash":
    """Feed the names, shapes, dtypes and bytes of `tensors` (in name order) into `digest`."""
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        digest.update(t.flatten().view(torch.uint8).numpy().tobytes())
    return digest


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of the model's parameters and buffers."""
    return hash_tensors(hashlib.sha256(), model.state_dict()).hexdigest()
