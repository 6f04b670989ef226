"""A source cut into parts: each part a run of rows of one shard (or of consecutive image files), named from what
it holds, so that the same source and part size always give the same parts under the same names."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np
import torch

from malex.data.shards import Shard, read_image_files, read_rows
from malex.errors import ConfigError

#: inputs per part unless told otherwise: one part's images, activations and scores stay a few MiB
DEFAULT_PART_SIZE = 4096


@dataclass(frozen=True)
class Part:
    """Rows [start, stop) of `shard` (kind 'npy', 'npz' or 'parquet'), or the image files `images`; `name` is
    the stem of its output file: its place in the source, then a digest of what it holds."""

    name: str
    shard: Shard | None = None
    start: int = 0
    stop: int = 0
    images: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.images) if self.images else self.stop - self.start

    def to_json(self) -> str:
        """The part as one JSON string (how it travels to a Ray actor)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Part":
        d = json.loads(text)
        return cls(d["name"], Shard(**d["shard"]) if d["shard"] else None, d["start"], d["stop"], tuple(d["images"]))

    def read(self, shape: tuple[int, int, int], resize: bool = False) -> tuple[list[str], np.ndarray, torch.Tensor]:
        """(source file of each input, its row in that file, the inputs as float32 NCHW in [0, 1]); encoded images
        of another size than `shape` are resized when `resize`, else refused."""
        if self.images:
            x = read_image_files(list(self.images), shape, resize)
            return list(self.images), np.zeros(len(self.images), dtype=np.int64), x
        x = read_rows(self.shard, self.start, self.stop, shape, resize)
        return [self.shard.path] * len(self), np.arange(self.start, self.stop, dtype=np.int64), x


def _named(seq: int, what: dict) -> str:
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]
    return f"part-{seq:06d}-{digest}"


def plan_parts(shards: list[Shard], part_size: int = DEFAULT_PART_SIZE) -> list[Part]:
    """The parts of `shards` in source order: each array or Parquet shard cut into runs of at most `part_size`
    rows, consecutive image files gathered into runs of at most `part_size` files."""
    if isinstance(part_size, bool) or not isinstance(part_size, int) or part_size < 1:
        raise ConfigError(f"part size {part_size!r}; expected an int >= 1")
    parts: list[Part] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            parts.append(Part(_named(len(parts), {"images": run}), images=tuple(run)))
            run.clear()

    for shard in shards:
        if shard.kind == "image":
            run.append(shard.path)
            if len(run) == part_size:
                flush()
            continue
        flush()
        for start in range(0, shard.rows, part_size):
            stop = min(start + part_size, shard.rows)
            what = {"path": shard.path, "key": shard.key, "start": start, "stop": stop}
            parts.append(Part(_named(len(parts), what), shard, start, stop))
    flush()
    return parts
