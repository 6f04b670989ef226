"""Datasets (the embedded digits, .npz archives, MNIST IDX, CIFAR-10 batches; by name or path) and
validation of user inputs."""

from malex.data.dataset import Dataset, Split, grouped_split, split_keeping_groups, stratified_split
from malex.data.digits import load_digits
from malex.data.npz import load_npz
from malex.data.registry import DATASET_NAMES, load_dataset
from malex.data.validate import to_labels, to_nchw_float

__all__ = ["DATASET_NAMES", "Dataset", "Split", "load_dataset", "load_digits", "load_npz", "grouped_split",
           "split_keeping_groups", "stratified_split", "to_labels", "to_nchw_float"]
