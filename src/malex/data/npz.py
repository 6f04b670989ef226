"""Datasets stored as `.npz` archives of uint8 NHWC images (the layout of `../shared/data/`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from malex.data.files import load_arrays
from malex.data.dataset import Dataset, Split, stratified_split
from malex.data.validate import to_labels, to_nchw_float
from malex.errors import DataFileError, InputError

REQUIRED = ("x_train", "y_train", "x_test", "y_test")


def _check_images(name: str, arr: np.ndarray, path: Path) -> None:
    if arr.dtype != np.uint8:
        raise DataFileError(f"{path}: array {name} has dtype {arr.dtype}; expected uint8 images (0..255)")
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise DataFileError(
            f"{path}: array {name} has shape {arr.shape}; expected uint8 NHWC images (N, H, W, 1 or 3)"
        )


def load_npz(path: str | Path, seed: int = 0, val_fraction: float = 0.1, name: str | None = None) -> Dataset:
    """Load an `.npz` with x_train, y_train, x_test, y_test (and optionally x_val, y_val).

    Without x_val/y_val, a stratified `val_fraction` of the training set (chosen by `seed`) becomes the
    validation split. Every array is checked; a problem raises `DataFileError` naming the file.
    """
    path = Path(path)
    arrays = load_arrays(path)
    if set(arrays) == {""}:
        raise DataFileError(f"{path}: holds a single array, not a dataset; expected an .npz archive with "
                            f"{', '.join(REQUIRED)}")
    missing = [k for k in REQUIRED if k not in arrays]
    if missing:
        raise DataFileError(f"{path}: missing arrays {', '.join(missing)}; found {', '.join(sorted(arrays)) or 'none'}")

    has_val = "x_val" in arrays and "y_val" in arrays
    splits = ["train", "test"] + (["val"] if has_val else [])
    shape = None
    loaded: dict[str, Split] = {}
    for split in splits:
        xs, ys = arrays[f"x_{split}"], arrays[f"y_{split}"]
        _check_images(f"x_{split}", xs, path)
        here = (xs.shape[3], xs.shape[1], xs.shape[2])
        if shape is None:
            shape = here
        elif here != shape:
            raise DataFileError(f"{path}: x_{split} images are {here} but x_train images are {shape}; expected one size")
        try:
            x = to_nchw_float(xs.transpose(0, 3, 1, 2), shape=shape, source=f"{path} x_{split}")
            y = to_labels(ys, n=xs.shape[0], source=f"{path} y_{split}")
        except InputError as exc:
            raise DataFileError(str(exc)) from exc
        loaded[split] = Split(x, y)

    num_classes = int(max(int(s.y.max()) for s in loaded.values())) + 1
    if not has_val:
        train_idx, val_idx = stratified_split(loaded["train"].y, (1.0 - val_fraction, val_fraction), seed)
        loaded["val"] = loaded["train"].subset(val_idx)
        loaded["train"] = loaded["train"].subset(train_idx)
    return Dataset(
        name=name or path.stem,
        train=loaded["train"],
        val=loaded["val"],
        test=loaded["test"],
        num_classes=num_classes,
    )
