"""The study's grid: its cells in the order they are computed, and a selected part of it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from malex.errors import ConfigError
from malex.evaluate.study.config import StudyConfig


@dataclass(frozen=True)
class Cell:
    """One cell of the grid."""

    dataset: str
    attack: str
    seed: int

    @property
    def label(self) -> str:
        return f"{self.dataset} / {self.attack} / seed {self.seed}"


def grid_cells(config: StudyConfig) -> list[Cell]:
    """Every cell, grouped so that one model's work is done together: per dataset and seed, the clean model's
    attacks, then each backdoor's."""
    out = []
    for ds in config.datasets:
        for seed in config.seeds:
            for key in ds.model_keys:
                out += [Cell(ds.name, a.name, seed) for a in ds.attacks_on(key)]
    return out


@dataclass(frozen=True)
class Selection:
    """A part of the grid to compute: cells whose dataset, attack and seed are among those named (None: any).
    Lets a long grid run in slices, in the order one chooses or on several machines into copies of a folder."""

    datasets: frozenset[str] | None = None
    attacks: frozenset[str] | None = None
    seeds: frozenset[int] | None = None

    @classmethod
    def of(cls, datasets: Iterable[str] = (), attacks: Iterable[str] = (), seeds: Iterable[int] = ()) -> "Selection":
        """Empty iterables select everything on that axis."""
        return cls(frozenset(datasets) or None, frozenset(attacks) or None, frozenset(seeds) or None)

    @property
    def everything(self) -> bool:
        return self.datasets is None and self.attacks is None and self.seeds is None

    def check(self, config: StudyConfig) -> None:
        """Raise ConfigError naming any dataset, attack or seed that the config's grid does not have."""
        known = {"dataset": {d.name for d in config.datasets},
                 "attack": {a.name for d in config.datasets for a in (*d.attacks, *d.adaptive)}, "seed": set(config.seeds)}
        for what, chosen in (("dataset", self.datasets), ("attack", self.attacks), ("seed", self.seeds)):
            unknown = sorted(map(str, (chosen or set()) - known[what]))
            if unknown:
                raise ConfigError(f"no {what} {', '.join(unknown)} in the study's grid; expected one of "
                                  f"{', '.join(sorted(map(str, known[what])))}")

    def covers(self, cell: Cell) -> bool:
        return ((self.datasets is None or cell.dataset in self.datasets)
                and (self.attacks is None or cell.attack in self.attacks)
                and (self.seeds is None or cell.seed in self.seeds))
