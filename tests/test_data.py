"""Data: the embedded digits, stratified splits, validation of user images and labels, .npz and .npy files."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits as sk_load_digits

from malex.data import load_digits, load_npz, stratified_split, to_labels, to_nchw_float
from malex.data.inputs import read_images
from malex.errors import DataFileError, InputError

# --------------------------------------------------------------------------------------------------- digits


def test_load_digits_shapes_dtypes_and_range(digits):
    assert digits.name == "digits"
    assert digits.num_classes == 10
    assert digits.image_shape == (1, 8, 8)
    assert digits.class_names == tuple(str(i) for i in range(10))
    sizes = [len(s) for s in (digits.train, digits.val, digits.test)]
    assert sum(sizes) == 1797
    # 60/20/20 split, up to per-class rounding
    for size, frac in zip(sizes, (0.6, 0.2, 0.2)):
        assert abs(size - frac * 1797) <= 10
    for split in (digits.train, digits.val, digits.test):
        assert split.x.dtype == torch.float32
        assert split.y.dtype == torch.int64
        assert split.x.shape[1:] == (1, 8, 8)
        assert split.x.shape[0] == split.y.shape[0]
        assert float(split.x.min()) >= 0.0 and float(split.x.max()) <= 1.0
        assert set(split.y.tolist()) == set(range(10))
    # the sklearn images hold 0..16; they are scaled by 1/16, so 1.0 is reached
    assert float(digits.train.x.max()) == 1.0


def test_load_digits_splits_cover_the_bundled_data(digits):
    bunch = sk_load_digits()
    all_y = torch.cat([digits.train.y, digits.val.y, digits.test.y])
    assert torch.equal(torch.bincount(all_y, minlength=10), torch.from_numpy(np.bincount(bunch.target)))
    all_x = torch.cat([digits.train.x, digits.val.x, digits.test.x])
    # every image appears exactly once: same multiset of flattened images as sklearn's, scaled by 1/16
    ours = np.sort(np.round(all_x.reshape(len(all_x), -1).numpy() * 16).astype(np.int64), axis=0)
    theirs = np.sort(bunch.images.reshape(len(bunch.images), -1).astype(np.int64), axis=0)
    assert np.array_equal(ours, theirs)


def test_load_digits_deterministic_by_seed_and_differs_across_seeds(digits):
    again = load_digits(0)
    for a, b in ((digits.train, again.train), (digits.val, again.val), (digits.test, again.test)):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    other = load_digits(1)
    assert not torch.equal(digits.train.x, other.train.x)
    assert not torch.equal(digits.test.y, other.test.y)


def test_stratified_split_disjoint_covering_and_stratified():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    parts = stratified_split(y, (0.6, 0.2, 0.2), seed=3)
    joined = torch.cat(parts)
    assert len(joined) == len(y)
    assert torch.equal(torch.sort(joined).values, torch.arange(len(y)))  # disjoint and covering
    for part, frac in zip(parts, (0.6, 0.2, 0.2)):
        counts = torch.bincount(y[part], minlength=3)
        for c, total in enumerate((50, 30, 20)):
            assert abs(int(counts[c]) - frac * total) <= 1
    again = stratified_split(y, (0.6, 0.2, 0.2), seed=3)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    other = stratified_split(y, (0.6, 0.2, 0.2), seed=4)
    assert not torch.equal(parts[0], other[0])


# ------------------------------------------------------------------------------------------- to_nchw_float


def test_uint8_nhwc_is_transposed_and_scaled():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(2, 4, 5, 3), dtype=np.uint8)
    x[0, 0, 0, 0], x[1, 0, 0, 0] = 0, 255
    out = to_nchw_float(x, shape=(3, 4, 5))
    assert out.dtype == torch.float32 and out.shape == (2, 3, 4, 5)
    expected = torch.from_numpy(x.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    assert torch.allclose(out, expected, atol=1e-7)
    assert float(out[0, 0, 0, 0]) == 0.0 and float(out[1, 0, 0, 0]) == 1.0


def test_uint8_nchw_kept_in_layout_and_scaled():
    x = np.arange(2 * 3 * 4 * 5, dtype=np.int64).reshape(2, 3, 4, 5).astype(np.uint8)
    out = to_nchw_float(x, shape=(3, 4, 5))
    assert out.shape == (2, 3, 4, 5)
    assert torch.allclose(out, torch.from_numpy(x).float() / 255.0)
    # without an expected shape, 4-D input is taken as NCHW as it is
    assert torch.equal(to_nchw_float(x), out)


def test_float_inputs_pass_through_as_float32():
    x64 = np.linspace(0, 1, 2 * 1 * 8 * 8).reshape(2, 1, 8, 8)
    out = to_nchw_float(x64, shape=(1, 8, 8))
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.from_numpy(x64).float())
    t = torch.rand(3, 1, 8, 8)
    assert torch.equal(to_nchw_float(t, shape=(1, 8, 8)), t)


def test_grey_nhw_gets_a_channel_axis():
    x = np.full((4, 8, 8), 255, dtype=np.uint8)
    out = to_nchw_float(x, shape=(1, 8, 8))
    assert out.shape == (4, 1, 8, 8)
    assert float(out.min()) == 1.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_rejected(bad):
    x = np.zeros((2, 1, 8, 8), dtype=np.float32)
    x[1, 0, 3, 3] = bad
    with pytest.raises(InputError, match="NaN or infinite"):
        to_nchw_float(x, shape=(1, 8, 8))


@pytest.mark.parametrize("value", [1.5, -0.25, 255.0])
def test_values_outside_unit_interval_rejected(value):
    x = np.zeros((2, 1, 8, 8), dtype=np.float32)
    x[0, 0, 0, 0] = value
    with pytest.raises(InputError, match=r"expected floats in \[0, 1\]") as info:
        to_nchw_float(x, shape=(1, 8, 8))
    assert f"{value:.4g}" in str(info.value)


@pytest.mark.parametrize("shape", [(8, 8), (64,), (1, 1, 1, 8, 8)])
def test_wrong_ndim_rejected(shape):
    with pytest.raises(InputError, match="expected 4 dimensions"):
        to_nchw_float(np.zeros(shape, dtype=np.float32), shape=(1, 8, 8))


def test_wrong_image_shape_rejected_naming_both_layouts():
    with pytest.raises(InputError) as info:
        to_nchw_float(np.zeros((2, 1, 7, 7), dtype=np.float32), shape=(1, 8, 8))
    msg = str(info.value)
    assert "(2, 1, 7, 7)" in msg and "expected (N, 1, 8, 8)" in msg and "(N, 8, 8, 1)" in msg


def test_channels_decide_the_layout_when_no_shape_is_known():
    x = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    nchw = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0
    assert torch.equal(to_nchw_float(x, channels=3), nchw)  # NHWC transposed
    assert torch.equal(to_nchw_float(np.ascontiguousarray(x.transpose(0, 3, 1, 2)), channels=3), nchw)  # NCHW kept
    assert to_nchw_float(np.zeros((2, 5, 6), dtype=np.uint8), channels=1).shape == (2, 1, 5, 6)  # grey (N, H, W)


@pytest.mark.parametrize("shape", [(2, 32, 32, 4), (2, 4, 32, 32)])
def test_channels_that_fit_neither_layout_are_one_input_error(shape):
    with pytest.raises(InputError) as info:
        to_nchw_float(np.zeros(shape, dtype=np.uint8), channels=3, source="clean.npy")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"clean.npy: images have shape {shape}")
    assert "expected (N, 3, H, W) or NHWC (N, H, W, 3)" in msg


def test_object_dtype_rejected():
    x = np.empty((1, 1, 2, 2), dtype=object)
    x[...] = 0.5
    with pytest.raises(InputError, match="dtype object"):
        to_nchw_float(x)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.int8, np.uint16, np.bool_])
def test_integer_and_bool_dtypes_rejected(dtype):
    x = np.zeros((1, 1, 8, 8), dtype=dtype)
    with pytest.raises(InputError, match="dtype") as info:
        to_nchw_float(x, shape=(1, 8, 8))
    assert "expected uint8" in str(info.value)


def test_empty_batch_and_non_array_rejected():
    with pytest.raises(InputError, match="no images"):
        to_nchw_float(np.zeros((0, 1, 8, 8), dtype=np.float32), shape=(1, 8, 8))
    with pytest.raises(InputError, match="NumPy array or torch tensor"):
        to_nchw_float([[[[0.0]]]])


def test_source_prefixes_the_message():
    with pytest.raises(InputError, match=r"^inputs\.npy: "):
        to_nchw_float(np.full((1, 1, 8, 8), 2.0, dtype=np.float32), source="inputs.npy")


@pytest.mark.parametrize("array", [np.full((1, 1, 2, 2), "a"), np.zeros((1, 1, 2, 2), "datetime64[s]"),
                                   np.zeros((1, 1, 2, 2), np.complex64)])
def test_non_numeric_dtypes_rejected_with_input_error(array):
    # str and datetime arrays were a bare TypeError from torch.from_numpy
    with pytest.raises(InputError, match="dtype"):
        to_nchw_float(array, shape=(1, 2, 2))


def test_big_endian_arrays_accepted():
    # non-native byte order was a bare ValueError from torch.from_numpy
    x = np.full((1, 1, 2, 2), 0.5, dtype=">f4")
    assert torch.equal(to_nchw_float(x, shape=(1, 2, 2)), torch.full((1, 1, 2, 2), 0.5))
    with pytest.raises(InputError, match="NaN"):
        to_nchw_float(np.full((1, 1, 2, 2), np.nan, dtype=">f8"), shape=(1, 2, 2))


@pytest.mark.parametrize("dtype", [np.longdouble, np.clongdouble, "V4", "U1", "datetime64[s]", "timedelta64[s]",
                                   np.complex128, object])
def test_unsupported_image_dtypes_refused_listing_the_accepted_ones(dtype):
    # float128 (longdouble) was a bare TypeError from torch.from_numpy: a traceback in the CLI, a 500 in the service
    x = np.zeros((1, 1, 2, 2), dtype=dtype)
    with pytest.raises(InputError) as info:
        to_nchw_float(x, shape=(1, 2, 2), source="inputs")
    msg = str(info.value)
    assert msg.startswith(f"inputs: images have dtype {x.dtype}; ") and "\n" not in msg
    assert "expected uint8 (0..255) or float16, float32, float64 in [0, 1]" in msg


def test_accepted_image_dtypes_are_exactly_uint8_and_float16_32_64():
    from malex.data.validate import IMAGE_DTYPES

    assert set(IMAGE_DTYPES) == {np.dtype(np.uint8), np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)}
    for dtype in IMAGE_DTYPES:
        assert to_nchw_float(np.zeros((1, 1, 2, 2), dtype=dtype), shape=(1, 2, 2)).dtype == torch.float32


@pytest.mark.parametrize("dtype", [np.longdouble, "V8", "U1", "datetime64[s]"])
def test_unsupported_label_dtypes_refused_with_input_error(dtype):
    with pytest.raises(InputError, match=r"labels have dtype .*; expected integer class ids"):
        to_labels(np.zeros(2, dtype=dtype), n=2)


# ------------------------------------------------------------------------------------------------ to_labels


def test_labels_converted_to_int64():
    out = to_labels([3, 0, 9], n=3, num_classes=10)
    assert out.dtype == torch.int64 and out.tolist() == [3, 0, 9]
    whole = to_labels(np.array([1.0, 2.0]), n=2, num_classes=3)
    assert whole.dtype == torch.int64 and whole.tolist() == [1, 2]
    assert to_labels(torch.tensor([1, 1], dtype=torch.uint8), n=2).tolist() == [1, 1]


def test_labels_wrong_length_rejected():
    with pytest.raises(InputError, match="3 labels for 4 images"):
        to_labels([0, 1, 2], n=4)


def test_labels_wrong_ndim_rejected():
    with pytest.raises(InputError, match="one dimension"):
        to_labels(np.zeros((4, 1), dtype=np.int64), n=4)


def test_negative_labels_rejected():
    with pytest.raises(InputError, match="contain -1; expected class ids >= 0"):
        to_labels([0, -1, 2], n=3, num_classes=5)


def test_labels_at_or_above_num_classes_rejected():
    with pytest.raises(InputError, match="contain 10; expected class ids below 10"):
        to_labels([0, 10, 2], n=3, num_classes=10)
    assert to_labels([0, 9], n=2, num_classes=10).tolist() == [0, 9]


@pytest.mark.parametrize("values", [[0.0, 1.5], [0.0, np.nan], [np.inf, 1.0]])
def test_non_integer_float_labels_rejected(values):
    with pytest.raises(InputError, match="not whole numbers"):
        to_labels(np.array(values), n=2)


def test_bool_labels_rejected():
    with pytest.raises(InputError, match="bool"):
        to_labels(np.array([True, False]), n=2)


# ------------------------------------------------------------------------------------------------- load_npz


def _images(n: int, h: int = 6, w: int = 6, c: int = 1, start: int = 0) -> np.ndarray:
    """uint8 NHWC images whose first pixel holds the image's index, so splits can be traced back."""
    rng = np.random.default_rng(start)
    x = rng.integers(0, 256, size=(n, h, w, c), dtype=np.uint8)
    x[:, 0, 0, 0] = np.arange(start, start + n) % 256
    return x


def _labels(n: int, classes: int = 3) -> np.ndarray:
    return (np.arange(n) % classes).astype(np.int64)


def _write(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.fixture
def npz_path(tmp_path):
    return _write(tmp_path / "tiny.npz", x_train=_images(60), y_train=_labels(60),
                  x_test=_images(15, start=100), y_test=_labels(15))


def test_load_npz_makes_a_stratified_val_split(npz_path):
    data = load_npz(npz_path, seed=0, val_fraction=0.2)
    assert data.name == "tiny"
    assert data.num_classes == 3
    assert data.image_shape == (1, 6, 6)
    assert len(data.train) == 48 and len(data.val) == 12 and len(data.test) == 15
    # train and val partition the original training set, labels travel with their images
    x_train, y_train = _images(60), _labels(60)
    ids = [round(float(v) * 255) for v in torch.cat([data.train.x, data.val.x])[:, 0, 0, 0]]
    assert sorted(ids) == list(range(60))
    for split in (data.train, data.val):
        for img, label in zip(split.x, split.y):
            i = round(float(img[0, 0, 0]) * 255)
            assert int(label) == y_train[i]
            assert torch.allclose(img, torch.from_numpy(x_train[i]).permute(2, 0, 1).float() / 255.0)
    assert torch.bincount(data.val.y, minlength=3).tolist() == [4, 4, 4]
    assert torch.allclose(data.test.x, torch.from_numpy(_images(15, start=100)).permute(0, 3, 1, 2).float() / 255)
    assert data.test.y.tolist() == _labels(15).tolist()


def test_load_npz_val_split_depends_on_seed(npz_path):
    a, b, c = load_npz(npz_path, seed=0), load_npz(npz_path, seed=0), load_npz(npz_path, seed=1)
    assert torch.equal(a.val.x, b.val.x)
    assert not torch.equal(torch.sort(a.val.x[:, 0, 0, 0]).values, torch.sort(c.val.x[:, 0, 0, 0]).values)


def test_load_npz_uses_given_val_split(tmp_path):
    path = _write(tmp_path / "withval.npz", x_train=_images(30), y_train=_labels(30),
                  x_val=_images(9, start=50), y_val=_labels(9), x_test=_images(6, start=80), y_test=_labels(6))
    data = load_npz(path)
    assert len(data.train) == 30 and len(data.val) == 9
    assert torch.allclose(data.val.x, torch.from_numpy(_images(9, start=50)).permute(0, 3, 1, 2).float() / 255)
    assert data.val.y.tolist() == _labels(9).tolist()
    assert torch.allclose(data.train.x, torch.from_numpy(_images(30)).permute(0, 3, 1, 2).float() / 255)


def test_load_npz_rgb_nhwc_becomes_nchw(tmp_path):
    x = _images(12, h=5, w=7, c=3)
    path = _write(tmp_path / "rgb.npz", x_train=x, y_train=_labels(12, 2), x_test=x[:4], y_test=_labels(4, 2))
    data = load_npz(path)
    assert data.image_shape == (3, 5, 7)
    assert torch.allclose(data.test.x, torch.from_numpy(x[:4]).permute(0, 3, 1, 2).float() / 255)


def _assert_data_error(path, pattern):
    with pytest.raises(DataFileError, match=pattern) as info:
        load_npz(path)
    assert path.name in str(info.value)
    return str(info.value)


def test_load_npz_float_images_rejected(tmp_path):
    path = _write(tmp_path / "float.npz", x_train=_images(10).astype(np.float32) / 255, y_train=_labels(10),
                  x_test=_images(4), y_test=_labels(4))
    _assert_data_error(path, "x_train has dtype float32; expected uint8")


def test_load_npz_wrong_ndim_rejected(tmp_path):
    path = _write(tmp_path / "ndim.npz", x_train=_images(10)[..., 0], y_train=_labels(10),
                  x_test=_images(4), y_test=_labels(4))
    _assert_data_error(path, r"x_train has shape \(10, 6, 6\)")


def test_load_npz_missing_arrays_rejected(tmp_path):
    path = _write(tmp_path / "missing.npz", x_train=_images(10), y_train=_labels(10), x_test=_images(4))
    msg = _assert_data_error(path, "missing arrays y_test")
    assert "found x_test, x_train, y_train" in msg


def test_load_npz_mismatched_sizes_rejected(tmp_path):
    path = _write(tmp_path / "sizes.npz", x_train=_images(10), y_train=_labels(9),
                  x_test=_images(4), y_test=_labels(4))
    _assert_data_error(path, "9 labels for 10 images")


def test_load_npz_different_image_sizes_rejected(tmp_path):
    path = _write(tmp_path / "mixed.npz", x_train=_images(10), y_train=_labels(10),
                  x_test=_images(4, h=7, w=7), y_test=_labels(4))
    _assert_data_error(path, "expected one size")


def test_load_npz_negative_labels_rejected(tmp_path):
    y = _labels(10)
    y[3] = -2
    path = _write(tmp_path / "neg.npz", x_train=_images(10), y_train=y, x_test=_images(4), y_test=_labels(4))
    _assert_data_error(path, "y_train: labels contain -2")


def test_load_npz_pickled_arrays_rejected(tmp_path):
    obj = np.empty(10, dtype=object)
    obj[:] = [0] * 10
    path = _write(tmp_path / "pickled.npz", x_train=_images(10), y_train=obj, x_test=_images(4), y_test=_labels(4))
    _assert_data_error(path, "not a readable NumPy file")


@pytest.mark.parametrize("content", [b"", b"this is not numpy at all" * 20, b"PK\x03\x04 truncated zip"])
def test_load_npz_garbage_file_rejected(tmp_path, content):
    path = tmp_path / "garbage.npz"
    path.write_bytes(content)
    _assert_data_error(path, "not a readable NumPy file")


def test_load_npz_missing_file_rejected(tmp_path):
    _assert_data_error(tmp_path / "nowhere.npz", "no such file")
    with pytest.raises(DataFileError, match="no such file"):
        load_npz(tmp_path)  # a folder is not an archive


def test_load_npz_on_plain_npy_content_rejected(tmp_path):
    np.save(tmp_path / "plain.npy", _images(4))
    shutil.copy(tmp_path / "plain.npy", tmp_path / "plain.npz")
    _assert_data_error(tmp_path / "plain.npz", "single array, not a dataset")


# --------------------------------------------------------------------------------------------- read_images


def test_read_images_npy_uint8_nhwc(tmp_path):
    x = _images(5, h=8, w=8)
    np.save(tmp_path / "in.npy", x)
    out = read_images(tmp_path / "in.npy", (1, 8, 8))
    assert out.shape == (5, 1, 8, 8)
    assert torch.allclose(out, torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255)


def test_read_images_npz_prefers_known_keys(tmp_path):
    a = np.zeros((2, 1, 8, 8), np.float32)
    b = np.ones((3, 1, 8, 8), np.float32)
    np.savez(tmp_path / "keys.npz", other=a, images=b)
    assert read_images(tmp_path / "keys.npz", (1, 8, 8)).shape == (3, 1, 8, 8)  # "images" beats "other"
    np.savez(tmp_path / "x.npz", x_test=a, x=b)
    assert read_images(tmp_path / "x.npz", (1, 8, 8)).shape == (3, 1, 8, 8)  # "x" beats "x_test"
    np.savez(tmp_path / "first.npz", whatever=a)
    assert read_images(tmp_path / "first.npz", (1, 8, 8)).shape == (2, 1, 8, 8)


def test_read_images_errors(tmp_path):
    with pytest.raises(DataFileError, match="no such file"):
        read_images(tmp_path / "none.npy", (1, 8, 8))
    np.savez(tmp_path / "empty.npz")
    with pytest.raises(DataFileError, match="holds no arrays"):
        read_images(tmp_path / "empty.npz", (1, 8, 8))
    obj = np.empty((1, 1, 8, 8), dtype=object)
    np.save(tmp_path / "obj.npy", obj, allow_pickle=True)
    with pytest.raises(DataFileError, match="not a readable NumPy file"):
        read_images(tmp_path / "obj.npy", (1, 8, 8))
    (tmp_path / "junk.npy").write_bytes(b"\x00\x01junk")
    with pytest.raises(DataFileError, match="junk.npy"):
        read_images(tmp_path / "junk.npy", (1, 8, 8))
    # an .npy name on an .npz archive: refused with a DataFileError, or the archive's images are read
    np.savez(tmp_path / "zip.npz", x=np.full((3, 1, 8, 8), 0.5, np.float32))
    shutil.copy(tmp_path / "zip.npz", tmp_path / "zip.npy")
    try:
        out = read_images(tmp_path / "zip.npy", (1, 8, 8))
    except DataFileError as exc:
        assert "zip.npy" in str(exc)
    else:
        assert torch.equal(out, torch.full((3, 1, 8, 8), 0.5))


def test_read_images_validates_values_naming_the_file(tmp_path):
    x = np.zeros((2, 1, 8, 8), np.float32)
    x[0, 0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", x)
    with pytest.raises(InputError, match="nan.npy: images contain 1 NaN"):
        read_images(tmp_path / "nan.npy", (1, 8, 8))
    np.save(tmp_path / "shape.npy", np.zeros((2, 1, 9, 9), np.float32))
    with pytest.raises(InputError, match="shape.npy: images have shape"):
        read_images(tmp_path / "shape.npy", (1, 8, 8))


def test_read_images_npz_suffix_with_npy_content(tmp_path):
    np.save(tmp_path / "plain.npy", np.zeros((2, 1, 8, 8), np.float32))
    shutil.copy(tmp_path / "plain.npy", tmp_path / "plain.npz")
    try:
        out = read_images(tmp_path / "plain.npz", (1, 8, 8))
    except DataFileError:
        return  # refusing the file with a clear error is fine
    assert out.shape == (2, 1, 8, 8)  # and so is reading the one array it holds


def test_string_labels_rejected_with_input_error():
    with pytest.raises(InputError, match="labels have dtype"):
        to_labels(np.array(["a", "b"]), n=2)


def test_npz_with_square_three_channel_images_is_read_as_nhwc(tmp_path):
    x = np.zeros((4, 3, 3, 3), np.uint8)
    x[:, 0, 1, 2] = 255  # row 0, column 1, channel 2 in NHWC
    y = np.array([0, 1, 0, 1])
    np.savez(tmp_path / "sq.npz", x_train=x, y_train=y, x_test=x, y_test=y, x_val=x, y_val=y)
    ds = load_npz(tmp_path / "sq.npz")
    assert float(ds.test.x[0, 2, 0, 1]) == 1.0 and float(ds.test.x.sum()) == 4.0
