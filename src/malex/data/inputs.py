"""Reading images a user hands to the CLI: .npy arrays, .npz archives, or a folder of PNG/JPEG images."""

from __future__ import annotations

from pathlib import Path

import torch

from malex.data.files import load_arrays
from malex.data.images import read_image_folder
from malex.data.validate import to_nchw_float
from malex.errors import DataFileError

#: keys tried, in order, when an .npz holds several arrays
NPZ_IMAGE_KEYS = ("x", "images", "x_test")


def read_images(path: str | Path, shape: tuple[int, int, int], resize: bool = False) -> torch.Tensor:
    """Images from an .npy file, an .npz archive or a folder of PNG/JPEG images (`read_image_folder`, its labels
    dropped, resized to the model's size when `resize`), validated for a model taking (C, H, W) inputs."""
    if Path(path).is_dir():
        return read_image_folder(path, size=tuple(shape[1:]), channels=shape[0], resize=resize)[0]
    arrays = load_arrays(path)
    key = next((k for k in ("",) + NPZ_IMAGE_KEYS if k in arrays), next(iter(arrays), None))
    if key is None:
        raise DataFileError(f"{path}: the archive holds no arrays")
    return to_nchw_float(arrays[key], shape=shape, source=str(path))
