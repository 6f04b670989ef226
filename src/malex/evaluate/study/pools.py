"""The clean splits of one (dataset, seed): detector fit and calibration inputs, clean test inputs and the
sources attacks start from."""

from __future__ import annotations

from dataclasses import dataclass

from malex.data import load_dataset
from malex.data.dataset import Dataset, Split, split_keeping_groups, stratified_split
from malex.errors import ConfigError
from malex.evaluate.study.config import DatasetSpec, StudyConfig


@dataclass(frozen=True)
class Pools:
    """The validation split cut in two (fit, calibration; near-copies on one side) and the test split cut in
    two (clean test inputs, attack sources), stratified by the seed."""

    data: Dataset
    fit: Split
    calibration: Split
    clean: Split
    sources: Split

    @property
    def grouped(self) -> bool:
        """Does the validation split come in groups of near-copies (GTSRB's tracks)?"""
        return self.data.val.groups is not None


def make_pools(config: StudyConfig, ds: DatasetSpec, seed: int) -> Pools:
    """Load `ds` and cut its splits for `seed`; at most n_fit fit and n_calibration calibration inputs."""
    data = load_dataset(ds.data, seed=seed, data_dir=config.data_dir)
    if not 0 <= ds.target < data.num_classes:
        raise ConfigError(f"datasets.{ds.name}.target: {ds.target} is not a class of {data.name}; expected "
                          f"0..{data.num_classes - 1}")
    fit_idx, cal_idx = split_keeping_groups(data.val.y, data.val.groups, (0.5, 0.5), seed,
                                            part_names=("the detectors' fit pool", "their calibration pool"))
    clean_idx, source_idx = stratified_split(data.test.y, (0.5, 0.5), seed)
    return Pools(data, data.val.subset(fit_idx[:ds.n_fit]), data.val.subset(cal_idx[:ds.n_calibration]),
                 data.test.subset(clean_idx), data.test.subset(source_idx))
