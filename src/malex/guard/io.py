"""Guard files: one safetensors file, tensors plus a JSON header, verified on load; no pickle anywhere.

This module is the file format only: it writes and reads the plain pieces of a fitted guard (`GuardFile`);
`malex.guard.guard` assembles a Guard from them. The header records the guarded model's fingerprint (a
guard read for another model is refused) and a SHA-256 digest over the header and every tensor (an edited
or truncated file is refused).

Layout: header {"format", "version", "model_fingerprint", "config", "threshold", "detectors": {name:
exported metadata}, and optionally "model": where the model came from (`malex.models.sources.LoadedModel`'s
description: kind, arch, arch_kwargs, input_shape, num_classes, preprocessing, file_sha256; files saved before
it existed have no such key and load as before)}; tensors "det/NAME/KEY" (a detector's exported tensors) and
"cal/NAME" (its float64 calibration scores), and "typing/KEY" (a learned typing's arrays, `malex.guard.kind_model`;
only when the config's typing is "learned"). A guard saved with a key also carries "signature", an HMAC of the same content
(`malex.guard.signing`); a reader given a key refuses a guard without it or whose signature does not match.
The reader checks the header's pieces' types and the calibration scores (1-D float64, finite, one length);
`malex.guard.guard` checks the settings and each detector's state.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from malex.atomic import write_safetensors
from malex.errors import ModelFileError
from malex.guard.fingerprint import hash_tensors
from malex.guard.signing import KEY_ENV, signature, signature_matches

FORMAT = "malex-guard"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class GuardFile:
    """The plain pieces of a guard file, per detector in the guard's order."""

    fingerprint: str  # of the guarded model's weights
    config: dict[str, Any]  # the GuardConfig as a JSON-able dict
    threshold: dict[str, Any]  # the calibrated Threshold as a dict
    detectors: dict[str, tuple[dict[str, Any], dict[str, torch.Tensor]]]  # name -> Detector.export()
    calibration: dict[str, np.ndarray]  # name -> clean calibration scores
    source: dict[str, Any] | None = None  # the model's source description; None in older files
    typing: dict[str, torch.Tensor] = field(default_factory=dict)  # a learned typing's tensors; none in older files


def malformed(path: Path, exc: Exception) -> ModelFileError:
    """The error for a guard file whose header lacks or mistypes a piece (one line, naming the file)."""
    return ModelFileError(f"{path}: the guard header is incomplete or malformed ({' '.join(str(exc).split())})")


def _digest(header: dict, tensors: dict[str, torch.Tensor]) -> str:
    return hash_tensors(hashlib.sha256(json.dumps(header, sort_keys=True).encode()), tensors).hexdigest()


def write_guard_file(path: str | Path, contents: GuardFile, overwrite: bool = False, key: bytes | None = None) -> Path:
    """Write `contents` to `path`, signed when a `key` is given; refuses to replace an existing file unless
    `overwrite`."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --force) to replace it")
    tensors: dict[str, torch.Tensor] = {}
    detectors = {}
    for name, (meta, det_tensors) in contents.detectors.items():
        detectors[name] = meta
        tensors.update({f"det/{name}/{k}": v for k, v in det_tensors.items()})
        tensors[f"cal/{name}"] = torch.from_numpy(np.asarray(contents.calibration[name], dtype=np.float64))
    tensors.update({f"typing/{k}": v for k, v in contents.typing.items()})
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model_fingerprint": contents.fingerprint,
        "config": contents.config,
        "threshold": contents.threshold,
        "detectors": detectors,
    }
    if contents.source is not None:
        header["model"] = contents.source
    meta = {"malex": json.dumps(header), "digest": _digest(header, tensors)}
    if key is not None:
        meta["signature"] = signature(header, tensors, key)
    return write_safetensors(path, tensors, meta)


def _verified(path: Path, key: bytes | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """The header and tensors of a readable malex guard file of this version whose digest (and, given a
    `key`, signature) matches."""
    if not path.is_file():
        raise ModelFileError(f"{path}: no such guard file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: not a readable guard file ({exc}); it may be truncated or not a guard") from exc
    if "malex" not in meta or "digest" not in meta:
        raise ModelFileError(f"{path}: a safetensors file without a malex guard header; expected a malex guard file")
    try:
        header = json.loads(meta["malex"])
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: the guard header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a malex guard file (format {header.get('format') if isinstance(header, dict) else None!r})")
    if header.get("version") != FORMAT_VERSION:
        raise ModelFileError(f"{path}: guard format version {header.get('version')}; this malex reads {FORMAT_VERSION}")
    if _digest(header, tensors) != meta["digest"]:
        raise ModelFileError(f"{path}: the guard file's contents do not match its digest; it was modified or damaged")
    if key is not None:
        if "signature" not in meta:
            raise ModelFileError(f"{path}: the guard file is not signed, but a guard key is configured ({KEY_ENV} "
                                 "or --guard-key-file); expected a guard saved with that key")
        if not signature_matches(header, tensors, key, meta["signature"]):
            raise ModelFileError(f"{path}: the guard file's signature does not match the configured guard key; "
                                 "it was signed with another key or modified after signing")
    return header, tensors


_HEADER_TYPES = {"model_fingerprint": str, "config": dict, "threshold": dict, "detectors": dict}


def _check_header(path: Path, header: dict) -> None:
    """`ModelFileError` unless every piece of the header is there with its type."""
    for name, kind in _HEADER_TYPES.items():
        if not isinstance(header.get(name), kind):
            raise malformed(path, TypeError(f"{name} is {header.get(name)!r}; expected a {kind.__name__}"))
    if not isinstance(header.get("model", {}), dict):
        raise malformed(path, TypeError(f"model is {header['model']!r}; expected a dict"))
    names = header["config"].get("detectors")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise malformed(path, TypeError(f"config.detectors is {names!r}; expected a list of detector names"))


def _check_calibration(path: Path, calibration: dict[str, torch.Tensor]) -> None:
    """`ModelFileError` unless every detector's calibration scores are 1-D float64, finite and of one length."""
    lengths = set()
    for name, scores in calibration.items():
        where = f"{path}: tensor cal/{name}"
        if scores.dtype != torch.float64 or scores.ndim != 1 or scores.numel() == 0:
            raise ModelFileError(f"{where} is {scores.dtype} of shape {tuple(scores.shape)}; expected 1-D float64 "
                                 "calibration scores")
        if not torch.isfinite(scores).all():
            raise ModelFileError(f"{where} holds NaN or infinite calibration scores; expected finite scores")
        lengths.add(scores.numel())
    if len(lengths) > 1:
        found = ", ".join(f"cal/{name} {t.numel()}" for name, t in calibration.items())
        raise ModelFileError(f"{path}: calibration scores of different lengths ({found}); expected one score per "
                             "calibration input for every detector")


def read_guard_file(path: str | Path, fingerprint: str, key: bytes | None = None) -> GuardFile:
    """Read and verify a guard file; refused when it was not fitted for the model whose weights
    fingerprint is `fingerprint`, when a piece is missing or mistyped, or, given a `key`, when it was not
    signed with it."""
    path = Path(path)
    header, tensors = _verified(path, key)
    _check_header(path, header)
    if header["model_fingerprint"] != fingerprint:
        raise ModelFileError(f"{path}: this guard was fitted for a different model (weights fingerprint differs)")
    try:
        detectors = {}
        for name in header["config"]["detectors"]:
            prefix = f"det/{name}/"
            detectors[name] = (header["detectors"][name],
                               {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        calibration = {name: tensors[f"cal/{name}"] for name in detectors}
    except (KeyError, TypeError) as exc:
        raise malformed(path, exc) from exc
    _check_calibration(path, calibration)
    calibration_arrays = {name: scores.numpy() for name, scores in calibration.items()}
    typing = {k[len("typing/"):]: v for k, v in tensors.items() if k.startswith("typing/")}
    return GuardFile(header["model_fingerprint"], header["config"], header["threshold"], detectors, calibration_arrays,
                     header.get("model"), typing)


def read_guard_source(path: str | Path, key: bytes | None = None) -> dict[str, Any] | None:
    """The description of the model a verified guard file was fitted for (None for files without one)."""
    path = Path(path)
    header, _ = _verified(path, key)
    _check_header(path, header)
    return header.get("model")
