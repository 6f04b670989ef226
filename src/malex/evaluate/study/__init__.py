"""The study runner: a grid of datasets x attacks x detectors x seeds from a TOML config, cached and resumable,
with mean ± std tables and an offline HTML report of the three spaces.

    from malex.evaluate.study import load_config, run_study
    run = run_study("configs/digits.toml", "malex-out/study-digits")
"""

from malex.evaluate.study.config import (
    AnalysisConfig, AttackSpec, DatasetSpec, StudyConfig, load_config, parse_config,
)
from malex.evaluate.study.grid import Cell, Selection
from malex.evaluate.study.runner import Study, StudyRun, open_study, run_study

__all__ = ["AnalysisConfig", "AttackSpec", "Cell", "DatasetSpec", "Selection", "Study", "StudyConfig", "StudyRun",
           "load_config", "open_study", "parse_config", "run_study"]
