"""Clean data as users hold it: folders of PNG/JPEG images (one subfolder per class, or flat), read for the model's
channels and size, and refused in one line when a file is not an image, too large, or of another size."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from malex.data import load_digits
from malex.data.images import read_image_folder
from malex.data.inputs import read_images
from malex.errors import ConfigError, DataFileError, InputError


def digit_png(x: torch.Tensor) -> Image.Image:
    return Image.fromarray((x[0].numpy() * 255).round().astype(np.uint8), mode="L")


@pytest.fixture(scope="module")
def digits_test():
    return load_digits(0).test


def class_folder(root: Path, digits_test, per_class: int = 3, classes=("cat", "ant", "bee")) -> Path:
    """`per_class` digits of labels 0, 1, 2 saved as PNG (and one JPEG) under subfolders named `classes`."""
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        picks = (digits_test.y == label).nonzero().flatten()[:per_class]
        for j, i in enumerate(picks.tolist()):
            suffix = ".jpg" if j == 0 and label == 2 else ".png"
            digit_png(digits_test.x[i]).save(root / name / f"{j}{suffix}")
    return root


def test_labels_follow_the_sorted_subfolder_names(tmp_path, digits_test):
    root = class_folder(tmp_path / "clean", digits_test)
    (root / "README.txt").write_text("not an image, beside the class folders")
    x, y, names = read_image_folder(root, size=(8, 8), channels=1)
    assert names == ("ant", "bee", "cat") and x.shape == (9, 1, 8, 8) and x.dtype == torch.float32
    assert y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # ant = digit 1, bee = digit 2, cat = digit 0
    first_ant = digits_test.x[(digits_test.y == 1).nonzero()[0, 0]]
    assert torch.allclose(x[0], first_ant, atol=0.5 / 255 + 1e-6)  # PNG is lossless up to the 8-bit rounding


def test_a_flat_folder_has_no_labels_and_grey_files_become_rgb_for_a_three_channel_model(tmp_path, digits_test):
    for i in range(4):
        digit_png(digits_test.x[i]).save(tmp_path / f"{i}.png")
    x, y, names = read_image_folder(tmp_path, channels=3)
    assert y is None and names == () and x.shape == (4, 3, 8, 8)
    assert torch.equal(x[:, 0], x[:, 2])  # grey replicated into R, G and B


def test_a_wrong_size_is_refused_naming_the_file_or_resized(tmp_path, digits_test):
    for i in range(2):
        digit_png(digits_test.x[i]).save(tmp_path / f"{i}.png")
    digit_png(digits_test.x[2]).resize((12, 10)).save(tmp_path / "2.png")
    with pytest.raises(InputError) as info:
        read_image_folder(tmp_path, size=(8, 8), channels=1)
    assert str(info.value).startswith(f"{tmp_path / '2.png'}: the image is 10x12 pixels") and "expected 8x8" in \
        str(info.value)
    with pytest.raises(InputError, match="the size of the first image"):
        read_image_folder(tmp_path, channels=1)
    x, _, _ = read_image_folder(tmp_path, size=(8, 8), channels=1, resize=True)
    assert x.shape == (3, 1, 8, 8)


def test_a_file_that_is_not_an_image_is_named_in_a_one_line_error(tmp_path, digits_test):
    digit_png(digits_test.x[0]).save(tmp_path / "0.png")
    (tmp_path / "notes.png").write_text("these are my notes\nnot pixels")
    with pytest.raises(DataFileError) as info:
        read_image_folder(tmp_path, channels=1)
    assert str(info.value).startswith(f"{tmp_path / 'notes.png'}: not a readable PNG or JPEG image")
    assert "\n" not in str(info.value)


def test_decompression_bombs_and_deep_images_are_refused_before_decoding(tmp_path):
    Image.new("L", (300, 200)).save(tmp_path / "big.png")  # compresses to a few hundred bytes
    with pytest.raises(DataFileError, match=r"big.png: 300x200 pixels is more than the 10000"):
        read_image_folder(tmp_path, max_pixels=10_000)
    (tmp_path / "big.png").unlink()
    Image.new("I;16", (8, 8)).save(tmp_path / "deep.png")
    with pytest.raises(DataFileError, match="more than 8 bits per channel"):
        read_image_folder(tmp_path)


def test_empty_folders_missing_pillow_and_unreadable_channel_counts_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(DataFileError, match="no PNG or JPEG images"):
        read_image_folder(tmp_path)
    with pytest.raises(ConfigError, match="1 \\(grey\\) or 3 \\(RGB\\)"):
        read_image_folder(tmp_path, channels=4)
    Image.new("L", (8, 8)).save(tmp_path / "0.png")
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ConfigError, match="needs Pillow.*serve"):
        read_image_folder(tmp_path)


def test_read_images_takes_a_folder_for_scan_and_predict(tmp_path, digits_test):
    for i in range(3):
        digit_png(digits_test.x[i]).save(tmp_path / f"{i}.png")
    x = read_images(tmp_path, (1, 8, 8))
    assert x.shape == (3, 1, 8, 8)
    assert torch.allclose(x, digits_test.x[:3], atol=0.5 / 255 + 1e-6)


def test_fit_reads_clean_reference_images_from_a_class_folder(tmp_path, digits_test):
    from malex.cli import _clean_reference

    root = class_folder(tmp_path / "clean", digits_test)
    x, y, groups = _clean_reference(str(root), 0, None, (1, 8, 8))
    assert x.shape == (9, 1, 8, 8) and y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and groups is None
    np.save(tmp_path / "labels.npy", np.zeros(9, dtype=np.int64))
    with pytest.raises(ConfigError, match="labels come from its class subfolders"):
        _clean_reference(str(root), 0, tmp_path / "labels.npy", (1, 8, 8))
