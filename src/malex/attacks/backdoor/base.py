"""The trigger contract: a small object whose `apply(x)` stamps the trigger on a batch."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch


class Trigger(ABC):
    """A backdoor trigger. `apply` returns a new tensor; the input is never modified."""

    name: ClassVar[str]
    config_type: ClassVar[type]

    @abstractmethod
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Stamp the trigger on `x` (float32 NCHW in [0, 1]); returns a new tensor in [0, 1]."""

    def describe(self) -> dict:
        """JSON-able settings of this trigger."""
        return {"name": self.name}
