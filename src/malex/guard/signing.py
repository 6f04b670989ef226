"""Keyed signatures of guard files: HMAC-SHA256 over the content the digest covers (header and tensors).

A digest catches damage; only a key catches someone who edited a guard and recomputed its digest. A deployment
that configures a key (`KEY_ENV` or a key file) refuses every guard it did not sign with it. The key is read
where a guard is saved or loaded (`guard_key`) and passed down; nothing is cached.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Mapping

import torch

from malex.errors import ConfigError
from malex.guard.fingerprint import hash_tensors

#: the environment variable holding the guard key (its UTF-8 bytes), when no key file is given
KEY_ENV = "MALEX_GUARD_KEY"


def guard_key(key_file: str | Path | None, environ: Mapping[str, str]) -> bytes | None:
    """The guard key: the bytes of `key_file` (without a trailing newline) if given, else `environ[KEY_ENV]`,
    else None (guards are neither signed nor asked for a signature). An empty or unreadable key is a
    `ConfigError`."""
    if key_file is not None:
        try:
            key = Path(key_file).read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise ConfigError(f"guard key file {key_file}: cannot read it ({exc.strerror or exc}); "
                              "expected a readable file holding the key") from exc
        if not key:
            raise ConfigError(f"guard key file {key_file} is empty; expected the key's bytes")
        return key
    if KEY_ENV not in environ:
        return None
    if not environ[KEY_ENV]:
        raise ConfigError(f"{KEY_ENV} is set but empty; expected the guard key, or unset it to use no key")
    return environ[KEY_ENV].encode()


def signature(header: dict, tensors: dict[str, torch.Tensor], key: bytes) -> str:
    """HMAC-SHA256 (hex) under `key` of the header (as JSON with sorted keys) and the tensors."""
    mac = hmac.new(key, json.dumps(header, sort_keys=True).encode(), hashlib.sha256)
    return hash_tensors(mac, tensors).hexdigest()


def signature_matches(header: dict, tensors: dict[str, torch.Tensor], key: bytes, claimed: str) -> bool:
    """Whether `claimed` is the signature of this content under `key` (compared in constant time)."""
    return hmac.compare_digest(signature(header, tensors, key), claimed)
