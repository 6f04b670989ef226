"""Datasets by name or path: MNIST IDX files, CIFAR-10 python batches (restricted unpickling), the data
folder search; and the CIFAR-10 architecture. Every file here is written by the test itself in tmp_path:
nothing reads the project's shared data folder."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from malex.data import DATASET_NAMES, load_dataset
from malex.data.cifar_batches import read_cifar_folder, unpickle_restricted
from malex.data.idx import read_idx
from malex.data.registry import DATA_DIR_ENV, data_dir_candidates, find_data_file
from malex.errors import ConfigError, DataFileError

IDX_CODES = {np.dtype("uint8"): 0x08, np.dtype("int8"): 0x09, np.dtype("int16"): 0x0B, np.dtype("int32"): 0x0C,
             np.dtype("float32"): 0x0D, np.dtype("float64"): 0x0E}


def write_idx(path: Path, arr: np.ndarray, gz: bool = False) -> Path:
    """An IDX file as the MNIST distribution writes it: magic, big-endian dims, big-endian values."""
    header = bytes([0, 0, IDX_CODES[arr.dtype], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def mnist_like(rng: np.random.Generator, n: int, size: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """n distinct uint8 images (each starts with its own index) and labels cycling over 0..9."""
    x = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
    x[:, 0, 0] = np.arange(n)
    return x, (np.arange(n) % 10).astype(np.uint8)


# -------------------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", ["uint8", "int16", "int32", "float32", "float64"])
def test_idx_round_trip(tmp_path, gz, dtype):
    rng = np.random.default_rng(0)
    arr = (rng.standard_normal((3, 5, 4)) * 100).astype(dtype)
    back = read_idx(write_idx(tmp_path / "a-idx3", arr, gz))
    assert back.dtype == arr.dtype and back.dtype.isnative
    assert back.shape == (3, 5, 4)
    assert np.array_equal(back, arr)


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_or_padded_idx_is_a_data_file_error(tmp_path, gz):
    arr = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    payload = write_idx(tmp_path / "ok", arr).read_bytes()
    for name, data, words in (("cut", payload[:-100], "truncated"), ("long", payload + b"\x00", "longer"),
                              ("header", payload[:9], "truncated")):
        path = tmp_path / name
        path.write_bytes(gzip.compress(data) if gz else data)
        with pytest.raises(DataFileError, match=words):
            read_idx(path)
    if gz:  # a gzip stream cut short is caught as well
        (tmp_path / "cutgz").write_bytes(gzip.compress(payload)[:-30])
        with pytest.raises(DataFileError, match="cutgz"):
            read_idx(tmp_path / "cutgz")


def test_idx_bad_magic_type_code_and_absurd_header(tmp_path):
    bad = {"magic": (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x05", "magic number 01000801"),
           "code": (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x05", "type code 0x07"),
           "dims": (b"\x00\x00\x08\x00", "declares 0 dimensions"),
           "empty": (b"", "magic number missing")}
    for name, (data, message) in bad.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataFileError, match=f"{name}: .*{message}"):
            read_idx(tmp_path / name)
    # a header declaring ~8e27 values on a 30-byte file: refused at once, nothing of that size is allocated
    (tmp_path / "huge").write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 2**31, 2**31, 2**31) + b"\x00" * 18)
    with pytest.raises(DataFileError, match="truncated"):
        read_idx(tmp_path / "huge")
    with pytest.raises(DataFileError, match="no such file"):
        read_idx(tmp_path / "missing")


def write_mnist_folder(folder: Path, rng: np.random.Generator, n_train: int = 100, n_test: int = 20) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    xtr, ytr = mnist_like(rng, n_train)
    xte, yte = mnist_like(rng, n_test)
    write_idx(folder / "train-images-idx3-ubyte.gz", xtr, gz=True)
    write_idx(folder / "train-labels-idx1-ubyte", ytr)              # plain
    write_idx(folder / "t10k-images.idx3-ubyte", xte)               # the dotted variant name
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", yte, gz=True)
    return {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte}


def test_mnist_idx_folder_loads_as_a_dataset(tmp_path):
    arrays = write_mnist_folder(tmp_path / "mnist", np.random.default_rng(1))
    data = load_dataset(tmp_path / "mnist", seed=0)
    assert data.name == "mnist" and data.num_classes == 10 and data.image_shape == (1, 6, 6)
    assert data.class_names == tuple(str(i) for i in range(10))
    assert (len(data.train), len(data.val), len(data.test)) == (90, 10, 20)
    assert torch.equal(data.test.x, torch.from_numpy(arrays["x_test"]).float().div(255).unsqueeze(1))
    assert torch.equal(data.test.y, torch.from_numpy(arrays["y_test"]).long())
    # train + val are the training images, each with its own label (the first pixel names the image)
    xs = torch.cat([data.train.x, data.val.x])
    ys = torch.cat([data.train.y, data.val.y])
    ids = torch.round(xs[:, 0, 0, 0] * 255).long()
    assert sorted(ids.tolist()) == list(range(100))
    assert torch.equal(xs, torch.from_numpy(arrays["x_train"][ids.numpy()]).float().div(255).unsqueeze(1))
    assert torch.equal(ys, torch.from_numpy(arrays["y_train"][ids.numpy()]).long())
    assert torch.bincount(data.val.y, minlength=10).tolist() == [1] * 10  # stratified 10%
    assert not torch.equal(load_dataset(tmp_path / "mnist", seed=1).val.x, data.val.x)  # the seed picks val


def test_mnist_folder_missing_or_mismatched_files(tmp_path):
    rng = np.random.default_rng(2)
    write_mnist_folder(tmp_path / "a", rng)
    (tmp_path / "a" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataFileError, match="t10k-labels-idx1-ubyte"):
        load_dataset(tmp_path / "a")
    write_mnist_folder(tmp_path / "b", rng)
    write_idx(tmp_path / "b" / "train-labels-idx1-ubyte", np.zeros(99, np.uint8))
    with pytest.raises(DataFileError, match="100 images but .* 99 labels"):
        load_dataset(tmp_path / "b")
    write_mnist_folder(tmp_path / "c", rng)
    write_idx(tmp_path / "c" / "train-labels-idx1-ubyte", np.zeros(100, np.int32))
    with pytest.raises(DataFileError, match="expected uint8 labels"):
        load_dataset(tmp_path / "c")


# ------------------------------------------------------------------------------------------- CIFAR-10


def cifar_rows(images_nhwc: np.ndarray) -> np.ndarray:
    """The official row layout: per image 1,024 red values, then green, then blue, each row-major."""
    return np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2).reshape(len(images_nhwc), 3072))


def cifar_images(rng: np.random.Generator, n: int, first: int) -> np.ndarray:
    """n distinct NHWC images whose red top-left pixel is their index (from `first`)."""
    x = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    x[:, 0, 0, 0] = np.arange(first, first + n)
    return x


def batch_dict(images: np.ndarray, labels: list[int], label: bytes) -> dict:
    return {b"batch_label": label, b"labels": labels, b"data": cifar_rows(images),
            b"filenames": [b"img_%d.png" % i for i in range(len(labels))]}


def write_cifar_folder(folder: Path, rng: np.random.Generator, per_batch: int = 4, n_test: int = 10) -> dict:
    """The six batches and batches.meta, pickled at protocol 2 with byte-string keys."""
    folder.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for i in range(1, 6):
        x = cifar_images(rng, per_batch, first=(i - 1) * per_batch)
        y = [int(v) for v in rng.integers(0, 10, per_batch)]
        (folder / f"data_batch_{i}").write_bytes(
            pickle.dumps(batch_dict(x, y, b"training batch %d of 5" % i), protocol=2))
        xs.append(x)
        ys += y
    xte = cifar_images(rng, n_test, first=100)
    yte = [int(v) for v in np.arange(n_test) % 10]
    (folder / "test_batch").write_bytes(pickle.dumps(batch_dict(xte, yte, b"testing batch 1 of 1"), protocol=2))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    meta = {b"num_cases_per_batch": 10000, b"label_names": names, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return {"x_train": np.concatenate(xs), "y_train": np.array(ys), "x_test": xte, "y_test": np.array(yte)}


def test_cifar_batches_round_trip(tmp_path):
    want = write_cifar_folder(tmp_path / "cifar-10-batches-py", np.random.default_rng(3))
    arrays, names = read_cifar_folder(tmp_path)  # the parent folder (the archive's root) works too
    assert names[0] == "airplane" and names[-1] == "truck"
    for key, value in want.items():
        assert arrays[key].shape == value.shape and np.array_equal(arrays[key], value), key
    assert arrays["x_train"].dtype == np.uint8 and arrays["y_train"].dtype == np.int64

    data = load_dataset(tmp_path / "cifar-10-batches-py", seed=0)
    assert data.name == "cifar10" and data.image_shape == (3, 32, 32) and data.num_classes == 10
    assert data.class_names[3] == "cat"
    assert len(data.train) + len(data.val) == 20 and len(data.test) == 10
    assert torch.equal(data.test.x, torch.from_numpy(want["x_test"]).permute(0, 3, 1, 2).float().div(255))


def py2_pickle(batch: dict) -> bytes:
    """A batch pickled as Python 2's cPickle wrote the official files: protocol 2, byte strings as
    (SHORT_)BINSTRING, the array through numpy.core.multiarray._reconstruct."""
    def s(b: bytes) -> bytes:
        return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<I", len(b)) + b)

    def i(v: int) -> bytes:
        return b"J" + struct.pack("<i", v)

    def value(v) -> bytes:
        if isinstance(v, bytes):
            return s(v)
        if isinstance(v, int):
            return i(v)
        if isinstance(v, list):
            return b"](" + b"".join(value(e) for e in v) + b"e"
        assert isinstance(v, np.ndarray) and v.dtype == np.uint8 and v.ndim == 2
        dtype = b"cnumpy\ndtype\n" + s(b"u1") + b"K\x00K\x01\x87R" + b"(K\x03" + s(b"|") + b"NNN" + i(-1) + i(-1) \
            + b"K\x00tb"
        return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + s(b"b") + b"\x87R"
                + b"(K\x01" + i(v.shape[0]) + i(v.shape[1]) + b"\x86" + dtype + b"\x89" + s(v.tobytes()) + b"tb")

    return b"\x80\x02}(" + b"".join(value(k) + value(v) for k, v in batch.items()) + b"u."


def test_python2_style_batch_is_read(tmp_path):
    rng = np.random.default_rng(4)
    x = cifar_images(rng, 3, first=0)
    blob = py2_pickle(batch_dict(x, [7, 0, 9], b"training batch 1 of 5"))
    reference = pickle.loads(blob, encoding="bytes")  # the unrestricted reader agrees on what the blob holds
    assert np.array_equal(reference[b"data"], cifar_rows(x)) and reference[b"labels"] == [7, 0, 9]
    ours = unpickle_restricted(blob, "py2")
    assert np.array_equal(ours[b"data"], cifar_rows(x)) and ours[b"labels"] == [7, 0, 9]
    assert ours[b"filenames"][2] == b"img_2.png"
    folder = tmp_path / "py2"
    write_cifar_folder(folder, rng)
    (folder / "data_batch_3").write_bytes(blob)
    arrays, _ = read_cifar_folder(folder)
    assert np.array_equal(arrays["x_train"][8:11], x)
    assert arrays["y_train"][8:11].tolist() == [7, 0, 9]


class _Exploit:
    """Unpickling this calls os.system: a file carrying it must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Eval:
    def __reduce__(self):
        return eval, ("__import__('os').getcwd()",)


@pytest.mark.parametrize("where", ["top", "value", "labels"])
def test_pickle_naming_another_global_is_refused_without_running_it(tmp_path, where):
    rng = np.random.default_rng(5)
    folder = tmp_path / "evil"
    write_cifar_folder(folder, rng)
    marker = tmp_path / "pwned"
    evil = _Exploit(marker)
    batch = batch_dict(cifar_images(rng, 4, 0), [1, 2, 3, 4], b"x")
    obj = {"top": evil, "value": {**batch, b"batch_label": evil}, "labels": {**batch, b"labels": [evil]}}
    (folder / "data_batch_2").write_bytes(pickle.dumps(obj[where], protocol=2))
    with pytest.raises(DataFileError, match=r"data_batch_2.*(posix|os|nt)\.system.*refused"):
        load_dataset(folder)
    assert not marker.exists()
    with pytest.raises(DataFileError, match=r"(__builtin__|builtins)\.eval.*refused"):
        unpickle_restricted(pickle.dumps(_Eval(), protocol=2), "eval")
    with pytest.raises(DataFileError, match="junk: not a CIFAR-10 python batch"):
        unpickle_restricted(b"not a pickle", "junk")


def test_bad_cifar_batches(tmp_path):
    rng = np.random.default_rng(6)
    folder = tmp_path / "c"
    write_cifar_folder(folder, rng)
    good = batch_dict(cifar_images(rng, 4, 0), [1, 2, 3, 4], b"x")
    cases = {
        "shape": {**good, b"data": np.zeros((4, 3000), np.uint8)},
        "dtype": {**good, b"data": np.zeros((4, 3072), np.float32)},
        "range": {**good, b"labels": [1, 2, 3, 10]},
        "count": {**good, b"labels": [1, 2, 3]},
        "keys": {b"batch_label": b"x"},
        "kind": [1, 2, 3],
    }
    expected = {"shape": "uint8 of shape", "dtype": "uint8 of shape", "range": "expected 0..9",
                "count": "4 images but 3 labels", "keys": "missing data, labels", "kind": "holds a list"}
    for name, obj in cases.items():
        (folder / "test_batch").write_bytes(pickle.dumps(obj, protocol=2))
        with pytest.raises(DataFileError, match=expected[name]):
            load_dataset(folder)
    # a _codecs.encode other than latin-1 (a protocol-2 bytes object names it) is refused
    blob = pickle.dumps(good, protocol=2).replace(b"latin1", b"rot_13", 1)
    (folder / "test_batch").write_bytes(blob)
    with pytest.raises(DataFileError, match="latin-1"):
        load_dataset(folder)
    (folder / "test_batch").unlink()
    with pytest.raises(DataFileError, match="missing test_batch"):
        load_dataset(folder)


def test_cifar_tar_gz_archive(tmp_path):
    want = write_cifar_folder(tmp_path / "src" / "cifar-10-batches-py", np.random.default_rng(7))
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    data = load_dataset(archive)
    assert data.name == "cifar10" and len(data.test) == 10
    assert torch.equal(data.test.y, torch.from_numpy(want["y_test"]))
    assert not any(p.name == "cifar-10-batches-py" for p in tmp_path.iterdir())  # nothing extracted


# ------------------------------------------------------------------------------------- names and folders


def tiny_npz(path: Path, n: int = 100, size: int = 28) -> Path:
    rng = np.random.default_rng(8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, x_train=rng.integers(0, 256, (n, size, size, 1), dtype=np.uint8),
                        y_train=np.arange(n) % 10, x_test=rng.integers(0, 256, (10, size, size, 1), dtype=np.uint8),
                        y_test=np.arange(10))
    return path


def test_name_resolves_through_the_environment_variable(tmp_path, monkeypatch):
    tiny_npz(tmp_path / "env" / "mnist.npz")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "env"))
    data = load_dataset("mnist", seed=0)
    assert data.name == "mnist" and data.image_shape == (1, 28, 28)
    assert (len(data.train), len(data.val), len(data.test)) == (90, 10, 10)
    assert data.class_names == tuple(str(i) for i in range(10))
    assert load_dataset(" MNIST ").name == "mnist"  # names are case-insensitive
    # the data_dir argument beats the environment; a missing file says where it looked and what to set
    with pytest.raises(DataFileError) as info:
        load_dataset("cifar10", data_dir=tmp_path / "elsewhere")
    message = str(info.value)
    assert "cifar10.npz" in message and str(tmp_path / "elsewhere") in message and DATA_DIR_ENV in message
    with pytest.raises(DataFileError, match=f"cifar10.npz not found in {tmp_path / 'env'}"):
        load_dataset("cifar10")


def test_default_folders_are_searched_in_order(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    folders, _ = data_dir_candidates(environ={})
    assert folders[:2] == [Path("data"), Path("..") / "shared" / "data"]
    assert folders[2].parts[-2:] == ("shared", "data") and folders[2].is_absolute()
    monkeypatch.chdir(tmp_path)
    tiny_npz(tmp_path / "data" / "cifar10.npz", size=8)  # ./data comes first, so the project's files are not read
    assert find_data_file("cifar10") == Path("data") / "cifar10.npz"
    assert load_dataset("cifar10").image_shape == (1, 8, 8)
    assert data_dir_candidates(environ={DATA_DIR_ENV: "/x"})[0] == [Path("/x")]
    assert data_dir_candidates("/y", environ={DATA_DIR_ENV: "/x"})[0] == [Path("/y")]


def test_unknown_names_and_paths(tmp_path):
    with pytest.raises(DataFileError) as info:
        load_dataset("cifar100")
    assert all(name in str(info.value) for name in DATASET_NAMES)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFileError, match="neither MNIST IDX files .* nor CIFAR-10"):
        load_dataset(tmp_path / "empty")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DataFileError, match="junk.npz"):
        load_dataset(tmp_path / "junk.npz")
    npz = tiny_npz(tmp_path / "mine.npz", size=8)
    assert load_dataset(str(npz)).name == "mine"


def test_digits_by_name_matches_load_digits(digits):
    named = load_dataset("digits", seed=0)
    assert torch.equal(named.train.x, digits.train.x) and torch.equal(named.test.y, digits.test.y)
    assert not torch.equal(load_dataset("digits", seed=1).train.y, digits.train.y)


def test_cli_train_takes_a_dataset_name(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from malex.cli import app
    from malex.models import read_description

    tiny_npz(tmp_path / "data" / "mnist.npz")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "data"))
    result = CliRunner().invoke(app, ["train", str(tmp_path / "m.safetensors"), "--data", "mnist", "--epochs", "1"])
    assert result.exit_code == 0, result.output
    desc = read_description(tmp_path / "m.safetensors")
    assert desc["arch"] == "mnist_cnn" and desc["info"]["dataset"] == "mnist"


# ---------------------------------------------------------------------------------------- CIFAR model


def test_cifar_resnet_builds_forwards_and_probes(tmp_path):
    from malex.detectors.mutation import mutation_target
    from malex.models import build_model, load_model, save_model
    from malex.probe import Probe

    torch.manual_seed(0)
    model = build_model("cifar_resnet", (3, 32, 32), 10)
    assert all(int(m.num_batches_tracked) == 0 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    x = torch.rand(4, 3, 32, 32)
    model.train()
    assert model(x).shape == (4, 10)  # a training step's forward works (batch-norm in batch mode)
    model.eval()
    obs = Probe(model).run(x)
    shapes = {name: tuple(t.shape[1:]) for name, t in obs.features.items()}
    assert list(shapes.values()) == [(32, 16, 16), (64, 8, 8), (128, 4, 4), (256,), (10,)]
    assert torch.allclose(obs.logits, obs.features[model.probe_layers[-1]])
    assert isinstance(model.head[-1], nn.Linear) and model.head[-1].out_features == 10
    assert any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.head)  # MC dropout for KD+BU
    assert mutation_target(model, through_last_conv=True).module is model.head  # every dense layer sits in the head,
    # and, with a hidden dense layer in it, the backdoor side fuzzes the dense layers, not the last convolution
    # channels-last weights do not leak into the file: it loads back to the same outputs
    again, desc = load_model(save_model(model, tmp_path / "cifar.safetensors", "cifar_resnet"))
    assert desc["arch"] == "cifar_resnet" and torch.allclose(again(x), model(x), atol=1e-5)
    other = build_model("cifar_resnet", (3, 24, 24), 5)  # other sizes work; too small ones are refused
    assert other(torch.rand(2, 3, 24, 24)).shape == (2, 5) and other.head[1].in_features == 128
    with pytest.raises(ConfigError, match="cifar_resnet"):
        build_model("cifar_resnet", (3, 7, 7), 10)


def test_random_flip_mirrors_about_half_and_nothing_else():
    from malex.models.train import TrainConfig, _random_flip

    x = torch.rand(200, 3, 5, 7)
    out = _random_flip(x, torch.Generator().manual_seed(0))
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(3)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 70 < int(mirrored.sum()) < 130
    assert torch.equal(out, _random_flip(x, torch.Generator().manual_seed(0)))
    assert TrainConfig().flip is False


def test_grouped_split_keeps_groups_whole_and_the_class_mix():
    from malex.data import grouped_split

    y = torch.arange(3).repeat_interleave(40)  # 3 classes x 40 inputs
    groups = torch.arange(120) // 5  # 8 groups of 5 per class
    first, second = grouped_split(y, groups, (0.5, 0.5), seed=0)
    assert sorted(first.tolist() + second.tolist()) == list(range(120))
    assert not set(groups[first].tolist()) & set(groups[second].tolist())
    assert torch.bincount(y[first], minlength=3).tolist() == [20, 20, 20]
    again, _ = grouped_split(y, groups, (0.5, 0.5), seed=0)
    assert torch.equal(first, again)


def test_gtsrb_validation_tracks_become_groups_only_when_laid_out_as_tracks():
    from malex.data.dataset import Dataset, Split
    from malex.data.registry import GTSRB_TRACK_LENGTH, _with_gtsrb_tracks

    n = 3 * GTSRB_TRACK_LENGTH
    split = Split(torch.zeros(n, 3, 4, 4), torch.tensor([0] * 30 + [5] * 30 + [0] * 30))
    data = Dataset("gtsrb", split, split, split, 43)
    assert _with_gtsrb_tracks(data).val.groups.tolist() == [0] * 30 + [1] * 30 + [2] * 30
    shuffled = Split(split.x, split.y[torch.randperm(n, generator=torch.Generator().manual_seed(0))])
    assert _with_gtsrb_tracks(Dataset("gtsrb", shuffled, shuffled, shuffled, 43)).val.groups is None


def test_grouped_split_puts_every_class_on_both_sides_where_its_groups_allow():
    """Two unequal groups (sizes 9 and 1) used to both fall on the first side; a class with one group cannot be
    on both sides, and the warning names it and the side it misses."""
    import warnings

    from malex.data import grouped_split

    y = torch.tensor([0] * 10 + [1] * 10 + [2] * 10)
    groups = torch.tensor([0] * 9 + [1] + [2] * 5 + [3] * 5 + [4] * 10)  # class 0: 9 + 1, class 1: 5 + 5, class 2: one
    for seed in range(6):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit, cal = grouped_split(y, groups, (0.6, 0.4), seed, part_names=("fit", "calibration"))
        assert set(y[fit].tolist()) == {0, 1, 2} and set(y[cal].tolist()) == {0, 1}
        assert not set(groups[fit].tolist()) & set(groups[cal].tolist())
        messages = [str(w.message) for w in caught]
        assert len(messages) == 1 and "calibration: class 2" in messages[0]


def test_grouped_split_warns_nothing_when_every_class_has_groups_enough():
    import warnings

    from malex.data import grouped_split

    y = torch.arange(3).repeat_interleave(10)
    groups = torch.arange(30) // 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit, cal = grouped_split(y, groups, (0.6, 0.4), 0)
    assert set(y[fit].tolist()) == set(y[cal].tolist()) == {0, 1, 2}
