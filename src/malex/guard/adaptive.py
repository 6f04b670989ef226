"""Adaptive attacks against a fitted guard: what to aim at, the plain-PGD baseline, and "attacker success".

An adaptive attack is aimed at a *target*: the whole guard ("guard") or one of its members alone
(`Guard.member`, a one-detector guard with its own threshold at the guard's FPR). `aim` hands the target to the
attack: an evidence-aware attack (adaptive_pgd, orthogonal_pgd, adaptive_cw) gets the target's differentiable
evidence (`GuardEvidence`); feature matching gets the guard's clean inputs as guides (it ignores the target).
"Attacker success" is the share of inputs whose adversarial example fools the model AND passes the target at
its calibrated threshold. Used by the study (`malex.evaluate.study.adaptive`) and benchmarks/adaptive_attacks.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from malex.attacks.adversarial import AdversarialAttack, AdversarialResult, EvidenceAware, FeatureMatching
from malex.attacks.adversarial import make_adversarial
from malex.errors import ConfigError
from malex.guard.guard import Guard
from malex.guard.surrogate import GuardEvidence, SurrogateConfig

#: the name of the whole guard among the targets (the others are its members' names)
GUARD_TARGET = "guard"
#: attacks the study can aim at a guard: they take its evidence (or, feature matching, its clean inputs)
AIMABLE = (EvidenceAware, FeatureMatching)


def plain_pgd(eps: float, seed: int = 0) -> AdversarialAttack:
    """The study's PGD-Linf (eps 0.3: 40 steps of 0.01), its step scaled with eps: the baseline that ignores the
    guard."""
    return make_adversarial("pgd", eps=eps, alpha=eps / 30, steps=40, seed=seed)


def targets(guard: Guard, names: tuple[str, ...] | list[str]) -> dict[str, Guard]:
    """{name: the guard to pass} for each of `names`: "guard" is `guard`, a member's name that member alone."""
    return {name: guard if name == GUARD_TARGET else guard.member(name) for name in names}


def aims_at_target(attack: AdversarialAttack) -> bool:
    """Whether the attack is aimed at one target (evidence-aware), not the same for every target."""
    return isinstance(attack, EvidenceAware)


def aim(attack: AdversarialAttack, target: Guard, guides: tuple[torch.Tensor, torch.Tensor],
        config: SurrogateConfig = SurrogateConfig()) -> AdversarialAttack:
    """`attack` aimed at `target`: an evidence-aware attack gets the target's `GuardEvidence`; feature matching
    gets `guides` (clean inputs and labels, e.g. those the guard fitted on)."""
    if isinstance(attack, EvidenceAware):
        return attack.against(GuardEvidence(target, config))
    if isinstance(attack, FeatureMatching):
        return attack.toward(*guides)
    raise ConfigError(f"attack {attack.name!r} cannot be aimed at a guard; expected one of adaptive_pgd, "
                      "orthogonal_pgd, adaptive_cw, feature_matching")


def outcome(guard: Guard, result: AdversarialResult) -> dict[str, Any]:
    """Fooled, flagged and attacker-success rates of one attack run under one guard, its time and mean L2 / Linf
    perturbation over the fooled inputs."""
    flagged = np.asarray(guard.screen(result.x_adv).flagged, bool)
    fooled = result.success.numpy()
    return {"fooled": float(fooled.mean()), "flagged": float(flagged.mean()),
            "attacker_success": float((fooled & ~flagged).mean()), "seconds": float(result.seconds),
            "mean_l2": result.mean_l2, "mean_linf": result.mean_linf}


__all__ = ["AIMABLE", "GUARD_TARGET", "aim", "aims_at_target", "outcome", "plain_pgd", "targets"]
