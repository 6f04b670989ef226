"""Reading images a user hands to the CLI: .npy arrays or .npz archives."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from malex.data.validate import to_nchw_float
from malex.errors import DataFileError

#: keys tried, in order, when an .npz holds several arrays
NPZ_IMAGE_KEYS = ("x", "images", "x_test")


def read_images(path: str | Path, shape: tuple[int, int, int]) -> torch.Tensor:
    """Images from an .npy file or an .npz archive, validated for a model taking (C, H, W) inputs."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"{path}: no such file; expected an .npy or .npz array of images")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                keys = [k for k in NPZ_IMAGE_KEYS if k in archive.files] or archive.files[:1]
                if not keys:
                    raise DataFileError(f"{path}: the archive holds no arrays")
                array = archive[keys[0]]
        else:
            array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataFileError(f"{path}: not a readable NumPy file ({exc})") from exc
    if not isinstance(array, np.ndarray):
        raise DataFileError(f"{path}: expected one array of images, found {type(array).__name__}")
    return to_nchw_float(array, shape=shape, source=str(path))
