"""Clean images as users hold them: a folder of PNG/JPEG files, either one subfolder per class (torchvision's
ImageFolder layout; labels are the sorted subfolder names' indices) or flat (no labels). Decoded with Pillow
(the serve and test extras bring it), converted to grey or RGB, and resized or refused when their size is not
the model's. Every file's pixel count is read from its header and capped before it is decoded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from malex.data.validate import to_nchw_float
from malex.errors import ConfigError, DataFileError, InputError

#: file suffixes read as images (any case); other files are skipped, as torchvision's ImageFolder does
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: Pillow modes with 8 bits per channel, converted to grey ("L") or "RGB"
EIGHT_BIT_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")
#: most pixels one image may have (read from its header before decoding): refuses decompression bombs
MAX_PIXELS = 1 << 25


def pillow():
    """Pillow's Image module, or a one-line `ConfigError` naming the extra that brings it."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise ConfigError("reading PNG/JPEG images needs Pillow, which is not installed; install malex's serve "
                          "extra (pip install 'malex[serve]') or pillow") from exc
    return Image


def _image_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                  and not f.name.startswith("."))


def decode_image(image, file, name: str, channels: int | None, size: tuple[int, int] | None, resize: bool,
                 max_pixels: int, size_of: str) -> np.ndarray:
    """One image (`file`: a path or a binary stream; `name`: what errors call it; `image`: Pillow's Image module)
    as (H, W) or (H, W, 3) uint8, in `channels` (None: grey if the file is grey, else RGB), resized to `size`
    (H, W) when `resize`, else refused unless it has that size (`size_of`: whose size it is)."""
    try:
        with image.open(file) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise DataFileError(f"{name}: {w}x{h} pixels is more than the {max_pixels} an image may have")
            if img.mode not in EIGHT_BIT_MODES:
                raise DataFileError(f"{name}: image mode {img.mode!r} has more than 8 bits per channel; expected "
                                    "an 8-bit grey, RGB, RGBA or palette image")
            grey = channels == 1 or channels is None and img.mode in ("1", "L", "LA", "La")
            img = img.convert("L" if grey else "RGB")
            if size is not None and (h, w) != tuple(size):
                if not resize:
                    raise InputError(f"{name}: the image is {h}x{w} pixels (height x width); expected {size[0]}x"
                                     f"{size[1]}, {size_of} (or resize the images)")
                img = img.resize((size[1], size[0]), image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except (DataFileError, InputError):
        raise
    except Exception as exc:  # Pillow raises many kinds of errors on unreadable, truncated or foreign files
        raise DataFileError(f"{name}: not a readable PNG or JPEG image ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())})") from exc


def read_image_folder(path: str | Path, *, size: tuple[int, int] | None = None, channels: int | None = None,
                      resize: bool = False, max_pixels: int = MAX_PIXELS,
                      ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[str, ...]]:
    """(x, y or None, class names) from a folder of PNG/JPEG images, x float32 NCHW in [0, 1].

    A folder with subfolders is read as one subfolder per class (labels: the index of each subfolder's name
    in sorted order, as torchvision's ImageFolder gives them); a folder without is read flat, in sorted file
    order, without labels. `channels`: 1 (grey) or 3 (RGB), None for the first image's. `size` (H, W): every
    image must have it, or is resized to it when `resize`; None: every image must have the first one's.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise DataFileError(f"{folder}: not a folder; expected a folder of PNG/JPEG images or of class subfolders")
    if channels not in (None, 1, 3):
        raise ConfigError(f"images can be read with 1 (grey) or 3 (RGB) channels; the model takes {channels}")
    if resize and size is None:
        raise ConfigError("resize needs a size (height, width) to resize to")
    classes = tuple(sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")))
    files = [(f, k) for k, name in enumerate(classes) for f in _image_files(folder / name)] if classes else \
        [(f, -1) for f in _image_files(folder)]
    if not files:
        raise DataFileError(f"{folder}: no PNG or JPEG images; expected one subfolder of images per class "
                            "(ImageFolder layout) or a flat folder of images")
    image = pillow()
    size_of = "the model's size" if size is not None else f"the size of the first image, {files[0][0]}"
    arrays: list[np.ndarray] = []
    for file, _ in files:
        arrays.append(decode_image(image, file, str(file), channels, size, resize, max_pixels, size_of))
        channels = channels or (1 if arrays[0].ndim == 2 else 3)
        size = size or arrays[0].shape[:2]
    x = to_nchw_float(np.stack(arrays), channels=channels, source=str(folder))
    y = torch.tensor([k for _, k in files], dtype=torch.long) if classes else None
    return x, y, classes
