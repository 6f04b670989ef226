"""A guard and its model named by files, so that another process (a Ray actor) can load both itself."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from malex.guard.guard import Guard
from malex.guard.io import read_guard_source
from malex.models import ModelSpec, load


@dataclass(frozen=True)
class GuardSpec:
    """A guard file, the model it was fitted for (completed by the source the guard recorded) and the key the
    guard must be signed with (None: unsigned guards are accepted)."""

    guard_file: Path
    model: ModelSpec
    key: bytes | None = None

    def load(self) -> Guard:
        """The guard in front of its model, both checked as `Guard.load` and `malex.models.load` check them."""
        net = load(self.model.filled_from(read_guard_source(self.guard_file, self.key))).module
        return Guard.load(self.guard_file, net, key=self.key)
