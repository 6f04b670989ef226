"""The in-memory dataset that every loader returns."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Split:
    """Images (float32 NCHW in [0, 1]) and their int64 labels; `groups` (optional, int64) marks inputs that
    are near-copies of each other (GTSRB: the frames of one physical sign), which must not be split apart."""

    x: torch.Tensor
    y: torch.Tensor
    groups: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, index: torch.Tensor | slice) -> "Split":
        """The inputs at `index`."""
        return Split(self.x[index], self.y[index], None if self.groups is None else self.groups[index])


@dataclass(frozen=True)
class Dataset:
    """Train, validation and test splits with the facts a model needs about them."""

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    class_names: tuple[str, ...] = field(default=())

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.train.x.shape[1:]
        return int(c), int(h), int(w)


def grouped_split(y: torch.Tensor, groups: torch.Tensor, fractions: tuple[float, ...], seed: int,
                  part_names: tuple[str, ...] | None = None) -> list[torch.Tensor]:
    """As `stratified_split`, but whole groups go to one part: each group counts under the class of its
    first input; per class, its groups are shuffled and dealt out by the fractions (each group weighed by
    its size), so no group straddles two parts. A class with at least as many groups as there are parts has
    at least one group in every part (a group moves to an empty part from the part that holds the most more
    than its share); a class with fewer groups cannot, and a warning names those classes and the parts they
    miss (`part_names`, else part 0, 1, ...)."""
    gen = torch.Generator().manual_seed(seed)
    _, inverse = torch.unique(groups, return_inverse=True)
    sizes = torch.bincount(inverse)
    first = torch.full((len(sizes),), len(y), dtype=torch.long).scatter_reduce(
        0, inverse, torch.arange(len(y)), reduce="amin")
    group_class = y[first]
    total = float(sum(fractions))
    bounds = torch.tensor([sum(fractions[: i + 1]) / total for i in range(len(fractions) - 1)],
                          dtype=torch.float64)
    part_of_group = torch.empty(len(sizes), dtype=torch.long)
    missing: dict[int, list[int]] = {}
    for c in torch.unique(group_class):
        ids = torch.nonzero(group_class == c).flatten()
        ids = ids[torch.randperm(len(ids), generator=gen)]
        shares = sizes[ids].double() / sizes[ids].sum()
        middle = shares.cumsum(0) - shares / 2  # where each group sits in the class's shuffled order
        parts = (middle.unsqueeze(1) > bounds.unsqueeze(0)).sum(dim=1)
        _fill_empty_parts(parts, shares, fractions)
        part_of_group[ids] = parts
        empty = sorted(set(range(len(fractions))) - set(parts.tolist()))
        if empty:
            missing[int(c)] = empty
    if missing:
        _warn_missing(missing, fractions, part_names)
    part = part_of_group[inverse]
    out = []
    for i in range(len(fractions)):
        idx = torch.nonzero(part == i).flatten()
        out.append(idx[torch.randperm(len(idx), generator=gen)])
    return out


def _fill_empty_parts(parts: torch.Tensor, shares: torch.Tensor, fractions: tuple[float, ...]) -> None:
    """In place: while a part of positive fraction has no group of the class and another part holds two or
    more, move to it the smallest group of the part holding the most beyond its share."""
    total = float(sum(fractions))
    wanted = [f / total for f in fractions]
    while True:
        counts = torch.bincount(parts, minlength=len(fractions))
        empty = [i for i in range(len(fractions)) if counts[i] == 0 and fractions[i] > 0]
        donors = [i for i in range(len(fractions)) if counts[i] >= 2]
        if not empty or not donors:
            return
        excess = {i: float(shares[parts == i].sum()) - wanted[i] for i in donors}
        donor = max(donors, key=lambda i: excess[i])
        members = torch.nonzero(parts == donor).flatten()
        parts[members[int(torch.argmin(shares[members]))]] = empty[0]


def _warn_missing(missing: dict[int, list[int]], fractions: tuple[float, ...],
                  part_names: tuple[str, ...] | None) -> None:
    names = part_names if part_names is not None and len(part_names) == len(fractions) else tuple(
        f"part {i}" for i in range(len(fractions)))
    by_part: dict[int, list[int]] = {}
    for c, empty in missing.items():
        for i in empty:
            by_part.setdefault(i, []).append(c)
    said = "; ".join(f"{names[i]}: class{'es' if len(cs) > 1 else ''} {', '.join(map(str, cs))}"
                     for i, cs in sorted(by_part.items()))
    warnings.warn(f"{len(missing)} class(es) have fewer groups of near-copies than the split has parts, so the "
                  f"grouped split leaves them out of a part ({said}); give more groups (e.g. more tracks) of "
                  "those classes for every part to hold them", stacklevel=3)


def split_keeping_groups(y: torch.Tensor, groups: torch.Tensor | None, fractions: tuple[float, ...], seed: int,
                         part_names: tuple[str, ...] | None = None) -> list[torch.Tensor]:
    """`grouped_split` when `groups` (near-copies to keep together) is given, else `stratified_split`."""
    if groups is None:
        return stratified_split(y, fractions, seed)
    return grouped_split(y, groups, fractions, seed, part_names)


def stratified_split(y: torch.Tensor, fractions: tuple[float, ...], seed: int) -> list[torch.Tensor]:
    """Split indices 0..len(y)-1 into len(fractions) parts with the class mix of `y` in each."""
    gen = torch.Generator().manual_seed(seed)
    parts: list[list[torch.Tensor]] = [[] for _ in fractions]
    total = sum(fractions)
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        bounds = [round(len(idx) * sum(fractions[: i + 1]) / total) for i in range(len(fractions))]
        start = 0
        for i, end in enumerate(bounds):
            parts[i].append(idx[start:end])
            start = end
    out = []
    for p in parts:
        cat = torch.cat(p)
        out.append(cat[torch.randperm(len(cat), generator=gen)])
    return out
