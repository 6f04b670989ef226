"""Datasets by name or by path: one entry point for the CLI, the benchmarks and library users.

Names: `digits` (embedded, no file), `mnist`, `gtsrb` and `cifar10` (the `.npz` archives of the project's
shared data folder, see `DATASET_FILES`). The folder holding those archives is, in this order: the
`data_dir` argument; else the folder in the environment variable `MALEX_DATA_DIR`; else the first of
`./data`, `../shared/data` (both relative to the current directory) and `shared/data` beside the
project this package was installed from that holds the file.

Paths: an `.npz` archive (x_train, y_train, x_test, y_test, optionally x_val, y_val), a folder of
MNIST's IDX files (gzipped or not), a CIFAR-10 python-batches folder, or `cifar-10-python.tar.gz`.
"""

from __future__ import annotations

import dataclasses
import os
import tarfile
from pathlib import Path
from collections.abc import Mapping

import numpy as np
import torch

from malex.data.cifar_batches import is_cifar_folder, read_cifar_archive, read_cifar_folder
from malex.data.dataset import Dataset, Split, stratified_split
from malex.data.digits import load_digits
from malex.data.idx import is_mnist_folder, read_mnist_folder
from malex.data.npz import load_npz
from malex.data.validate import to_labels, to_nchw_float
from malex.errors import DataFileError, InputError

#: dataset name -> file in the data folder
DATASET_FILES: dict[str, str] = {"mnist": "mnist.npz", "gtsrb": "gtsrb.npz", "cifar10": "cifar10.npz"}
#: every name `load_dataset` accepts
DATASET_NAMES: tuple[str, ...] = ("digits", *DATASET_FILES)
#: environment variable naming the data folder
DATA_DIR_ENV = "MALEX_DATA_DIR"
#: share of the training set held out as validation split when a dataset brings none
VAL_FRACTION = 0.1

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
GTSRB_CLASSES = (
    "Speed limit (20km/h)", "Speed limit (30km/h)", "Speed limit (50km/h)", "Speed limit (60km/h)",
    "Speed limit (70km/h)", "Speed limit (80km/h)", "End of speed limit (80km/h)", "Speed limit (100km/h)",
    "Speed limit (120km/h)", "No passing", "No passing for vehicles over 3.5 metric tons",
    "Right-of-way at the next intersection", "Priority road", "Yield", "Stop", "No vehicles",
    "Vehicles over 3.5 metric tons prohibited", "No entry", "General caution", "Dangerous curve to the left",
    "Dangerous curve to the right", "Double curve", "Bumpy road", "Slippery road", "Road narrows on the right",
    "Road work", "Traffic signals", "Pedestrians", "Children crossing", "Bicycles crossing", "Beware of ice/snow",
    "Wild animals crossing", "End of all speed and passing limits", "Turn right ahead", "Turn left ahead",
    "Ahead only", "Go straight or right", "Go straight or left", "Keep right", "Keep left",
    "Roundabout mandatory", "End of no passing", "End of no passing by vehicles over 3.5 metric tons",
)
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "mnist": tuple(str(i) for i in range(10)),
    "gtsrb": GTSRB_CLASSES,
    "cifar10": CIFAR10_CLASSES,
}


def data_dir_candidates(data_dir: str | Path | None = None,
                        environ: Mapping[str, str] | None = None) -> tuple[list[Path], str]:
    """The folders searched for a named dataset's file, in order, and what chose them (for messages)."""
    environ = os.environ if environ is None else environ
    if data_dir is not None:
        return [Path(data_dir)], "the data_dir argument"
    if environ.get(DATA_DIR_ENV):
        return [Path(environ[DATA_DIR_ENV])], f"${DATA_DIR_ENV}"
    project = Path(__file__).resolve().parents[3]  # src/malex/data/registry.py -> the project folder
    found = [Path("data"), Path("..") / "shared" / "data", project.parent / "shared" / "data"]
    return list(dict.fromkeys(found)), "the default places"


def find_data_file(name: str, data_dir: str | Path | None = None) -> Path:
    """The file of named dataset `name` (see `DATASET_FILES`) in the first data folder that holds it."""
    if name not in DATASET_FILES:
        raise DataFileError(f"no data file for dataset {name!r}; named files: "
                            f"{', '.join(f'{k} ({v})' for k, v in DATASET_FILES.items())}")
    folders, chosen_by = data_dir_candidates(data_dir)
    file = DATASET_FILES[name]
    for folder in folders:
        if (folder / file).is_file():
            return folder / file
    looked = ", ".join(str(f.absolute()) for f in folders)
    raise DataFileError(f"dataset {name!r}: {file} not found in {looked} ({chosen_by}); set {DATA_DIR_ENV} to "
                        f"the folder holding {file}, or give the file's path instead of the name")


def dataset_from_arrays(arrays: Mapping[str, np.ndarray], name: str, source: str, seed: int = 0,
                        val_fraction: float = VAL_FRACTION, class_names: tuple[str, ...] = ()) -> Dataset:
    """A `Dataset` from uint8 NHWC x_train/x_test and label arrays y_train/y_test (checked); a stratified
    `val_fraction` of the training set, chosen by `seed`, becomes the validation split."""
    splits = {}
    for split in ("train", "test"):
        xs = arrays[f"x_{split}"]
        shape = (xs.shape[3], xs.shape[1], xs.shape[2]) if xs.ndim == 4 else None
        try:
            x = to_nchw_float(xs, shape=shape, source=f"{source} x_{split}")
            y = to_labels(arrays[f"y_{split}"], n=x.shape[0], source=f"{source} y_{split}")
        except InputError as exc:
            raise DataFileError(str(exc)) from exc
        splits[split] = Split(x, y)
    train_idx, val_idx = stratified_split(splits["train"].y, (1.0 - val_fraction, val_fraction), seed)
    num_classes = max(int(s.y.max()) for s in splits.values()) + 1
    return Dataset(name=name, train=splits["train"].subset(train_idx), val=splits["train"].subset(val_idx),
                   test=splits["test"], num_classes=num_classes, class_names=class_names)


def is_dataset_folder(path: Path) -> bool:
    """Whether `path` is a folder `load_dataset` reads (MNIST IDX files or CIFAR-10 python batches)."""
    return path.is_dir() and (is_mnist_folder(path) or is_cifar_folder(path))


def _load_path(path: Path, seed: int) -> Dataset:
    if path.is_dir():
        if is_mnist_folder(path):
            return dataset_from_arrays(read_mnist_folder(path), "mnist", str(path), seed,
                                       class_names=CLASS_NAMES["mnist"])
        if is_cifar_folder(path):
            arrays, names = read_cifar_folder(path)
            return dataset_from_arrays(arrays, "cifar10", str(path), seed, class_names=names or CIFAR10_CLASSES)
        raise DataFileError(f"{path}: a folder with neither MNIST IDX files (train-images-idx3-ubyte[.gz], ...) "
                            "nor CIFAR-10 python batches (data_batch_1..5, test_batch)")
    if path.suffix != ".npz" and tarfile.is_tarfile(path):
        arrays, names = read_cifar_archive(path)
        return dataset_from_arrays(arrays, "cifar10", str(path), seed, class_names=names or CIFAR10_CLASSES)
    return load_npz(path, seed=seed)


#: frames per physical sign ("track") in GTSRB's training set, which the shared archive's validation split
#: keeps whole and in order (see its README)
GTSRB_TRACK_LENGTH = 30


def _with_gtsrb_tracks(dataset: Dataset) -> Dataset:
    """GTSRB with its validation split's tracks as groups, when the split is laid out as whole tracks
    (consecutive blocks of GTSRB_TRACK_LENGTH frames of one class); unchanged otherwise."""
    y = dataset.val.y
    n = len(y)
    if n == 0 or n % GTSRB_TRACK_LENGTH:
        return dataset
    blocks = y.view(-1, GTSRB_TRACK_LENGTH)
    if not bool((blocks == blocks[:, :1]).all()):
        return dataset
    groups = torch.arange(n) // GTSRB_TRACK_LENGTH
    return dataclasses.replace(dataset, val=Split(dataset.val.x, y, groups))


def load_dataset(name_or_path: str | Path, seed: int = 0, data_dir: str | Path | None = None) -> Dataset:
    """The dataset called `name_or_path` (one of `DATASET_NAMES`), or the one stored at that path.

    `seed` chooses the digits' splits and, for datasets without a validation split, the stratified 10% of
    the training set held out for validation (GTSRB brings its own). A name wins over a same-named path
    (write ./mnist for the folder). Raises `DataFileError` saying where it looked when nothing is found.
    """
    key = str(name_or_path).strip()
    if key.lower() in DATASET_NAMES:
        key = key.lower()
        if key == "digits":
            return load_digits(seed)
        dataset = load_npz(find_data_file(key, data_dir), seed=seed, name=key)
        if key == "gtsrb":
            dataset = _with_gtsrb_tracks(dataset)
        names = CLASS_NAMES[key]
        return dataclasses.replace(dataset, class_names=names) if len(names) == dataset.num_classes else dataset
    path = Path(key)
    if not path.exists():
        raise DataFileError(f"{key!r} is neither a dataset name ({', '.join(DATASET_NAMES)}) nor an existing path; "
                            "expected a name, an .npz archive, a folder of MNIST IDX files, or CIFAR-10's python "
                            "batches (folder or .tar.gz)")
    return _load_path(path, seed)
