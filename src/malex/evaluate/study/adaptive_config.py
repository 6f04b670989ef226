"""An adaptive attack of the study: an [adversarial.NAME] table whose attack is aimed at the guard.

    [adversarial.NAME]
    attack = "adaptive_pgd"      # or orthogonal_pgd (evidence-aware), feature_matching (guided by clean inputs)
    eps = 0.2                    # ... and the attack's other settings
    budget_scale = [0.5, 1, 2]   # the budgets measured, in multiples of eps (default [1])
    targets = ["guard", "members"]  # what it is aimed at: the guard, each member alone ("members"), or named
                                 # members of the guard (default: the guard and every member)
    n_sources = 100              # correctly classified attack sources per seed (default 100)

Per (dataset, seed) the attack runs on the clean model against the guard fitted in that cell, at every budget and
for every target, beside plain PGD at the same budget (`malex.guard.adaptive.plain_pgd`); see adaptive.py.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from malex.errors import ConfigError
from malex.evaluate.study.fields import as_settings, check_keys, config_fields, read_int

#: the kind of an adaptive attack (beside "backdoor" and "adversarial"); its results are not grid cells
ADAPTIVE = "adaptive"
#: in `targets`: every member of the dataset's guard, each attacked alone
MEMBERS = "members"
_KEYS = {"attack", "budget_scale", "targets", "n_sources"}


@dataclass(frozen=True)
class AdaptiveSpec:
    """An adaptive attack of the study: the registry attack and its settings, the budgets (multiples of its eps),
    what it is aimed at, and how many sources each seed attacks."""

    name: str
    method: str
    settings: dict[str, Any] = field(default_factory=dict)
    budget_scale: tuple[float, ...] = (1.0,)
    targets: tuple[str, ...] = ("guard", MEMBERS)
    n_sources: int = 100
    kind: str = ADAPTIVE

    @property
    def eps(self) -> float:
        """The attack's eps (its setting, else its config's default)."""
        from malex.attacks.adversarial import ADVERSARIAL_ATTACKS

        return float(ADVERSARIAL_ATTACKS[self.method].config_class(**self.settings).eps)

    @property
    def budgets(self) -> tuple[float, ...]:
        """The eps of each budget measured."""
        return tuple(self.eps * s for s in self.budget_scale)

    def targets_of(self, guard: tuple[str, ...]) -> tuple[str, ...]:
        """The targets with "members" expanded to the guard's members (each once, in the guard's order)."""
        out: list[str] = []
        for t in self.targets:
            out += list(guard) if t == MEMBERS else [t]
        return tuple(dict.fromkeys(out))

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def is_adaptive(method: str) -> bool:
    """Whether the registry attack `method` is aimed at a guard (evidence-aware, or feature matching)."""
    from malex.attacks.adversarial import ADVERSARIAL_ATTACKS
    from malex.guard.adaptive import AIMABLE

    return issubclass(ADVERSARIAL_ATTACKS[method], AIMABLE)


def parse_adaptive(name: str, method: str, table: dict[str, Any], where: str) -> AdaptiveSpec:
    """The adaptive attack of an [adversarial.NAME] table whose `attack` is `method` (checked as registered and
    adaptive); every bad setting is a `ConfigError` naming its key."""
    from malex.attacks.adversarial import ADVERSARIAL_ATTACKS, make_adversarial

    config_class = ADVERSARIAL_ATTACKS[method].config_class
    if "eps" not in config_fields(config_class):
        raise ConfigError(f"{where}.attack: {method!r} has no Linf budget (eps); the study measures adaptive attacks "
                          "per budget (adaptive_pgd, orthogonal_pgd, feature_matching); measure it with "
                          "benchmarks/adaptive_attacks.py")
    if "targeted" in table:
        raise ConfigError(f"{where}.targeted: adaptive attacks run untargeted in the study; remove the key")
    settings = as_settings({k: v for k, v in table.items() if k not in _KEYS})
    check_keys(settings, config_fields(config_class) | _KEYS, where)
    try:
        attack = make_adversarial(method, **settings)
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc

    scale = table.get("budget_scale", [1.0])
    if not isinstance(scale, list) or not scale or not all(
            isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s > 0 for s in scale) \
            or len(set(scale)) != len(scale):
        raise ConfigError(f"{where}.budget_scale: {scale!r}; expected a non-empty list of distinct numbers > 0 "
                          "(multiples of eps)")
    eps = float(attack.config.eps)
    for s in scale:
        try:
            make_adversarial(method, **{**settings, "eps": eps * s})
        except ConfigError as exc:
            raise ConfigError(f"{where}.budget_scale: {s:g} x eps {eps:g}: {exc}") from exc

    targets = table.get("targets", ["guard", MEMBERS])
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets) \
            or len(set(targets)) != len(targets):
        raise ConfigError(f"{where}.targets: {targets!r}; expected a non-empty list of distinct names: \"guard\", "
                          f"\"{MEMBERS}\" or members of the guard")
    n = read_int(table, "n_sources", where, 100, minimum=1)
    return AdaptiveSpec(name, method, settings, tuple(float(s) for s in scale), tuple(targets), n)


def check_targets(spec: AdaptiveSpec, guard: tuple[str, ...], combination: str, where: str) -> None:
    """Refuse targets that are not the guard or its members, members without a differentiable surrogate (for an
    evidence-aware attack), and a whole-guard target whose guard does not combine by Fisher's rule."""
    from malex.attacks.adversarial import ADVERSARIAL_ATTACKS, EvidenceAware
    from malex.detectors import DETECTORS
    from malex.guard.adaptive import GUARD_TARGET
    from malex.guard.surrogate import has_surrogate

    for t in spec.targets:
        if t not in (GUARD_TARGET, MEMBERS) and t not in guard:
            raise ConfigError(f"{where}.targets: {t!r} is not a member of the guard ({', '.join(guard)}); expected "
                              f"\"{GUARD_TARGET}\", \"{MEMBERS}\" or one of its members")
    if not issubclass(ADVERSARIAL_ATTACKS[spec.method], EvidenceAware):
        return
    chosen = spec.targets_of(guard)
    aimed = set(guard) if GUARD_TARGET in chosen else set(chosen)
    lacking = [d for d in guard if d in aimed and not has_surrogate(DETECTORS[d])]
    if lacking:
        raise ConfigError(f"{where}.targets: {', '.join(lacking)} of the guard has no differentiable surrogate; "
                          "aim only at members that have one (mahalanobis, kd_bu, lid, msp, the mutation tests)")
    if GUARD_TARGET in chosen and combination != "fisher" and len(guard) > 1:
        raise ConfigError(f"{where}.targets: the guard combines by {combination!r}; the adaptive attack's evidence "
                          "follows Fisher's rule only (aim at its members, or set guard_combination = \"fisher\")")
