"""Validation of user-supplied images and labels.

Every image tensor malex works on is float32, NCHW, with values in [0, 1]. These helpers turn what a user
hands over (NumPy or torch, uint8 or float, NHWC or NCHW) into that form, or raise an `InputError` that
names the problem and what was expected.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from malex.errors import InputError

ArrayLike = np.ndarray | torch.Tensor

#: the NumPy dtypes images may have (native or either byte order): uint8 in 0..255, floats in [0, 1]
IMAGE_DTYPES = (np.dtype(np.uint8), np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
#: float label dtypes (whole numbers only); any integer dtype is accepted too
_FLOAT_LABEL_DTYPES = IMAGE_DTYPES[1:]
_EXPECTED_IMAGES = "expected uint8 (0..255) or float16, float32, float64 in [0, 1]"


def _where(source: str | None) -> str:
    return f"{source}: " if source else ""


def _native(array: np.ndarray, accepted: Sequence[np.dtype], what: str, expected: str) -> np.ndarray:
    """`array` in native byte order when its dtype (in either byte order) is one of `accepted`, else `InputError`."""
    native = array.dtype.newbyteorder("=") if array.dtype.byteorder in "<>" else array.dtype
    if native not in accepted:
        raise InputError(f"{what} have dtype {array.dtype}; {expected}")
    return array if array.dtype.isnative else array.astype(native)


def to_nchw_float(
    images: ArrayLike,
    *,
    shape: Sequence[int] | None = None,
    channels: int | None = None,
    source: str | None = None,
) -> torch.Tensor:
    """Return `images` as a float32 NCHW tensor in [0, 1], checking everything on the way.

    `shape` is the expected (C, H, W) of one image; when given, NHWC input with that layout is accepted
    and transposed. Without `shape`, `channels` (e.g. a model's first convolution's input channels) decides
    the layout: (N, channels, H, W) is kept, (N, H, W, channels) transposed, anything else refused. uint8
    input is scaled by 1/255; float16/32/64 input must already lie in [0, 1]; any other NumPy dtype (float128,
    complex, object, strings, datetimes, void) is refused naming the accepted ones.
    """
    where = _where(source)
    if isinstance(images, torch.Tensor):
        arr = images.detach().cpu()
    elif isinstance(images, np.ndarray):
        images = _native(images, IMAGE_DTYPES, f"{where}images", _EXPECTED_IMAGES)
        arr = torch.from_numpy(np.ascontiguousarray(images))
    else:
        raise InputError(f"{where}images must be a NumPy array or torch tensor, got {type(images).__name__}")

    if shape is not None:
        channels = int(shape[0]) if len(shape) == 3 else None
    if arr.ndim == 3 and channels == 1:
        arr = arr.unsqueeze(1)  # (N, H, W) grey images
    if arr.ndim != 4:
        raise InputError(f"{where}images have shape {tuple(arr.shape)}; expected 4 dimensions (N, C, H, W)")
    if arr.shape[0] == 0:
        raise InputError(f"{where}no images (batch of size 0)")
    if shape is not None:
        expected = tuple(int(s) for s in shape)
        if tuple(arr.shape[1:]) != expected:
            nhwc = (expected[1], expected[2], expected[0])
            if tuple(arr.shape[1:]) == nhwc:
                arr = arr.permute(0, 3, 1, 2)
            else:
                raise InputError(
                    f"{where}images have shape {tuple(arr.shape)}; expected (N, {', '.join(map(str, expected))})"
                    f" or NHWC (N, {', '.join(map(str, nhwc))})"
                )
    elif channels is not None and arr.shape[1] != channels:
        if arr.shape[3] != channels:
            raise InputError(f"{where}images have shape {tuple(arr.shape)}; the model takes {channels} channels: "
                             f"expected (N, {channels}, H, W) or NHWC (N, H, W, {channels})")
        arr = arr.permute(0, 3, 1, 2)

    if arr.dtype == torch.uint8:
        return arr.float().div_(255.0).contiguous()
    if arr.dtype == torch.bool or not (arr.is_floating_point()):
        raise InputError(f"{where}images have dtype {arr.dtype}; {_EXPECTED_IMAGES}")
    out = arr.float()
    if not torch.isfinite(out).all():
        bad = int((~torch.isfinite(out)).sum())
        raise InputError(f"{where}images contain {bad} NaN or infinite values; expected finite values in [0, 1]")
    lo, hi = float(out.min()), float(out.max())
    if lo < 0.0 or hi > 1.0:
        raise InputError(
            f"{where}image values span [{lo:.4g}, {hi:.4g}]; expected floats in [0, 1] "
            "(divide 8-bit images by 255, or pass them as uint8)"
        )
    return out.contiguous()


def to_labels(labels: ArrayLike, *, n: int, num_classes: int | None = None, source: str | None = None) -> torch.Tensor:
    """Return `labels` as an int64 tensor of length `n`, each in [0, num_classes)."""
    where = _where(source)
    if not isinstance(labels, torch.Tensor):
        labels = np.asarray(labels)
        accepted = _FLOAT_LABEL_DTYPES + ((labels.dtype.newbyteorder("="),) if labels.dtype.kind in "biu" else ())
        labels = _native(labels, accepted, f"{where}labels", "expected integer class ids")
    arr = labels.detach().cpu() if isinstance(labels, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(labels))
    if arr.ndim != 1:
        raise InputError(f"{where}labels have shape {tuple(arr.shape)}; expected one dimension (N,)")
    if arr.shape[0] != n:
        raise InputError(f"{where}{arr.shape[0]} labels for {n} images; expected one label per image")
    if arr.is_floating_point():
        if not torch.isfinite(arr).all() or not torch.equal(arr, arr.round()):
            raise InputError(f"{where}labels are not whole numbers; expected integer class ids")
    elif arr.dtype == torch.bool:
        raise InputError(f"{where}labels have dtype bool; expected integer class ids")
    arr = arr.long()
    if arr.numel() and int(arr.min()) < 0:
        raise InputError(f"{where}labels contain {int(arr.min())}; expected class ids >= 0")
    if num_classes is not None and arr.numel() and int(arr.max()) >= num_classes:
        raise InputError(f"{where}labels contain {int(arr.max())}; expected class ids below {num_classes}")
    return arr
