"""What every detector-aware attack shares: the defence as a plain differentiable callable.

`evidence(x) -> (N,)` gives, for a batch of inputs on the model's device, per-input evidence that is
differentiable with respect to x and positive where the defence flags the input (the guard's is
`malex.guard.surrogate.GuardEvidence`; attacks never import detectors or the guard). Without one, an
evidence-aware attack attacks the undefended model.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from malex.attacks.adversarial.base import AdversarialAttack, require

#: per-input differentiable evidence of a batch: positive where the defence flags the input
Evidence = Callable[[torch.Tensor], torch.Tensor]


class EvidenceAware(AdversarialAttack):
    """An attack that also keeps a defence's evidence down; built with `evidence=None` it ignores any defence."""

    def __init__(self, config: object = None, evidence: Evidence | None = None) -> None:
        super().__init__(config)
        require(evidence is None or callable(evidence), f"evidence is {evidence!r}; expected a callable or None")
        self.evidence = evidence

    def against(self, evidence: Evidence | None) -> "EvidenceAware":
        """The same attack aimed at another defence's evidence (None: no defence)."""
        return type(self)(self.config, evidence)

    def with_config(self, **changes: object) -> "EvidenceAware":
        """The same attack with some settings changed (e.g. another eps)."""
        return type(self)(dataclasses.replace(self.config, **changes), self.evidence)

    def evidence_of(self, x: torch.Tensor) -> torch.Tensor:
        """The defence's evidence of the batch `x` (zeros without a defence), checked to be one value per input."""
        if self.evidence is None:
            return torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        ev = self.evidence(x)
        require(isinstance(ev, torch.Tensor) and ev.shape == (x.shape[0],),
                f"evidence gave {tuple(ev.shape) if isinstance(ev, torch.Tensor) else type(ev).__name__} for "
                f"{x.shape[0]} inputs; expected one value per input")
        return ev
