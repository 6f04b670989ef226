"""The trigger contract: `apply(x)` stamps the test-time trigger on a batch; `poison(data, config)` builds the
poisoned training split (by default: stamp a share of non-target inputs and relabel them to the target)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from malex.data.dataset import Split
from malex.errors import ConfigError


@dataclass(frozen=True)
class PoisonConfig:
    """Stamp the trigger on a `rate` share of the training inputs and relabel them `target`."""

    rate: float = 0.1
    target: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.rate < 1.0:
            raise ConfigError(f"poisoning rate is {self.rate}; expected a value in (0, 1)")
        if self.target < 0:
            raise ConfigError(f"target label is {self.target}; expected a class id >= 0")


def choose_poisoned(data: Split, config: PoisonConfig, among: torch.Tensor | None = None,
                    what: str = "non-target") -> torch.Tensor:
    """Indices of round(rate * len(data)) non-target inputs, drawn by `config.seed` (deterministic).

    `among`: a bool mask of the inputs that may be chosen (default: all; TaCT's source classes); `what` names
    them in the error raised when too few are left."""
    allowed = data.y != config.target
    if among is not None:
        allowed = allowed & among
    candidates = torch.nonzero(allowed).flatten()
    n = int(round(config.rate * len(data)))
    if n < 1 or n > len(candidates):
        raise ConfigError(f"cannot poison {n} of {len(candidates)} {what} inputs; adjust the rate")
    gen = torch.Generator().manual_seed(config.seed)
    return candidates[torch.randperm(len(candidates), generator=gen)[:n]]


def choose_cover(data: Split, taken: torch.Tensor, n: int, seed: int, among: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Indices of `n` inputs of any class outside `taken`, drawn by `seed`: the inputs that carry a trigger
    variant but keep their true label (WaNet's noise samples, Adaptive-Blend's regularization samples).
    `among`: a bool mask of the inputs that may be chosen (default: all; TaCT's cover classes)."""
    free = torch.ones(len(data), dtype=torch.bool) if among is None else among.clone()
    free[taken] = False
    candidates = torch.nonzero(free).flatten()
    if n > len(candidates):
        raise ConfigError(f"cannot pick {n} cover inputs among the {len(candidates)} inputs left after poisoning; "
                          "lower the rate or the cover share")
    gen = torch.Generator().manual_seed(seed + 1)  # a stream apart from the one that chose the poisoned inputs
    return candidates[torch.randperm(len(candidates), generator=gen)[:n]]


class Trigger(ABC):
    """A backdoor trigger. `apply` returns a new tensor; the input is never modified."""

    name: ClassVar[str]
    config_type: ClassVar[type]

    @abstractmethod
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Stamp the test-time trigger on `x` (float32 NCHW in [0, 1]); returns a new tensor in [0, 1]."""

    def poison(self, data: Split, config: PoisonConfig) -> tuple[Split, torch.Tensor]:
        """A poisoned copy of the training split and the indices that carry the trigger and label `target`.

        Default (BadNets, Blend, Watermark): a `rate` share of non-target inputs get `apply` and the target
        label. Triggers whose training differs (cover inputs, a training-time trigger variant) override this.
        """
        chosen = choose_poisoned(data, config)
        x, y = data.x.clone(), data.y.clone()
        x[chosen] = self.apply(x[chosen])
        y[chosen] = config.target
        return Split(x, y), chosen

    def check_target(self, target: int) -> None:
        """Raise ConfigError when this trigger cannot aim at `target` (default: any target will do; TaCT refuses
        a target among its source or cover classes). Lets a config be refused before any training."""

    def attack_sources(self, y: torch.Tensor, target: int) -> torch.Tensor:
        """Bool mask over labels `y`: the inputs the backdoor is meant to send to `target`, on which its attack
        success rate is measured. Default: every input whose label is not the target; a source-specific trigger
        (TaCT) narrows it to its source classes."""
        return y != target

    def describe(self) -> dict:
        """JSON-able settings of this trigger."""
        return {"name": self.name}
