"""Reading NumPy files safely (no pickle), whatever their suffix claims."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from malex.errors import DataFileError


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays in an .npz archive by name, or {"": array} for a single .npy array.

    Raises `DataFileError` naming the file when it is missing, unreadable or needs pickle.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"{path}: no such file; expected an .npy array or an .npz archive")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return {"": loaded}
        with loaded as archive:
            return {k: archive[k] for k in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataFileError(f"{path}: not a readable NumPy file ({exc})") from exc
