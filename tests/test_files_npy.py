"""NumPy files whose header claims more data than the file holds are refused before anything is allocated."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from malex.data.files import load_arrays
from malex.data.inputs import read_images
from malex.data.npy import npy_from_bytes, read_npy_header
from malex.errors import DataFileError

HUGE = (1_000_000, 1_000_000, 8)  # 64 TB of float64: an allocation that fails (or swaps the machine)


def forged_npy(shape=HUGE, descr="<f8", payload=b"\0" * 64) -> bytes:
    """.npy bytes with an honest-looking header claiming `shape` and only `payload` after it."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue() + payload


def test_npy_claiming_a_huge_shape_refused_before_reading(tmp_path):
    # was a MemoryError traceback in the CLI (numpy allocates what the header claims)
    path = tmp_path / "huge.npy"
    path.write_bytes(forged_npy())
    with pytest.raises(DataFileError) as info:
        read_images(path, (1, 8, 8))
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg
    assert f"shape {HUGE}" in msg and "64 bytes" in msg and "truncated" in msg


def test_npz_member_claiming_a_huge_shape_refused_before_reading(tmp_path):
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("y.npy", forged_npy((3,), "<i8", np.arange(3).tobytes()))
        archive.writestr("x.npy", forged_npy())
    with pytest.raises(DataFileError, match=r"huge\.npz member x\.npy: .*claims shape \(1000000, 1000000, 8\)"):
        load_arrays(path)


def test_cli_predict_on_a_forged_npy_ends_in_one_line(tmp_path, monkeypatch, capsys):
    import sys

    import torch

    from malex.cli import main
    from malex.models import build_model, save_model

    torch.manual_seed(0)
    model = save_model(build_model("digits_cnn", (1, 8, 8), 10), tmp_path / "m.safetensors", "digits_cnn")
    (tmp_path / "huge.npy").write_bytes(forged_npy())
    monkeypatch.setattr(sys, "argv", ["malex", "predict", str(model), str(tmp_path / "huge.npy")])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err.count("\n") == 0 and err.startswith("error: ") and "huge.npy" in err


@pytest.mark.parametrize("array", [np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 24,
                                   np.asfortranarray(np.arange(6, dtype=">i2").reshape(2, 3)),
                                   np.zeros((0, 5), np.uint8)])
def test_honest_files_still_read(tmp_path, array):
    np.save(tmp_path / "a.npy", array)
    np.savez_compressed(tmp_path / "b.npz", x=array)
    assert np.array_equal(load_arrays(tmp_path / "a.npy")[""], array)
    assert np.array_equal(load_arrays(tmp_path / "b.npz")["x"], array)
    buf = io.BytesIO()
    np.save(buf, array)
    assert np.array_equal(npy_from_bytes(buf.getvalue(), "body"), array)


def test_npy_from_bytes_refuses_short_long_and_corrupt_bodies():
    with pytest.raises(DataFileError, match=r"^body: .*claims shape .* but 64 bytes follow"):
        npy_from_bytes(forged_npy(), "body")
    with pytest.raises(DataFileError, match=r"^body: .* but 72 bytes follow"):
        npy_from_bytes(forged_npy((8,), payload=b"\0" * 72), "body")
    with pytest.raises(DataFileError, match=r"^body: not an \.npy"):
        npy_from_bytes(b"PK\3\4 not numpy", "body")
    with pytest.raises(DataFileError, match=r"^body: the \.npy header is unreadable"):
        npy_from_bytes(b"\x93NUMPY\x01\x00\xff\xff{garbage", "body")


def test_header_reports_shape_dtype_and_size():
    header = read_npy_header(io.BytesIO(forged_npy((2, 3), "<f4")), "x.npy")
    assert header.shape == (2, 3) and header.dtype == np.float32 and header.nbytes == 24
    assert header.offset == len(forged_npy((2, 3), "<f4", b""))


def test_npz_member_with_a_forged_directory_size_refused(tmp_path):
    # the zip directory's recorded size is as forgeable as the .npy header: 4 GB recorded, 4 GB claimed,
    # 64 bytes of data compressed to a few
    path = tmp_path / "forged.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", forged_npy((500_000_000,)))
    data = bytearray(path.read_bytes())
    cd = data.rfind(b"PK\x01\x02")
    data[cd + 24:cd + 28] = (0xFFFFFFFE).to_bytes(4, "little")  # uncompressed size in the central directory
    path.write_bytes(bytes(data))
    assert zipfile.ZipFile(path).getinfo("x.npy").file_size == 0xFFFFFFFE
    with pytest.raises(DataFileError, match=r"claims shape \(500000000,\)"):
        load_arrays(path)
