"""Combination rules: one guard score per input from its detectors' p-values (higher = more suspicious).

Each rule is a class with a `name` in `COMBINATIONS`; the guard records the name (`GuardConfig.combination`)
and thresholds the combined score at the target false-positive rate on its clean calibration inputs, each
scored against the others, whatever the rule. Only the order of the scores matters for that threshold, so
each rule returns a monotone transform of its combined statistic that is finite for p-values down to the
smallest normal float.

* `fisher`: -2 sum(ln p). Several moderate p-values add up; a weak member's noise adds too.
* `cauchy`: the Cauchy combination (ACAT, Liu & Xie 2020): mean of tan((1/2 - p) pi), its tail driven by the
  smallest p-values and robust to dependence between detectors; here with each p capped at 1/2. Uncapped, a
  detector whose score lies at or below every clean one (p near 1: a backdoor input under the adversarial
  mutation test, the "wrong-way" side) adds a term near minus infinity that cancels every other member's
  evidence (measured on MNIST: backdoor AUROC 0.41 uncapped); capped, a member that sees nothing adds 0.
* `hmp`: the harmonic-mean p-value (Wilson 2019), as -ln(HMP) = ln(mean(1/p)): close to min-p when one member
  fires, and robust to dependence.
* `min_p`: -ln(min p), the strongest single member's evidence (a Bonferroni-like omnibus).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from malex.errors import ConfigError

#: p-values are floored here, so a score far beyond every clean one counts as very suspicious, not infinite
P_FLOOR = np.finfo(np.float64).tiny
#: below this p, tan((1/2 - p) pi) is computed as its limit 1 / (p pi) (tan loses all precision there)
_CAUCHY_SMALL = 1e-15


def _stacked(pvalues: dict[str, np.ndarray]) -> np.ndarray:
    if not pvalues:
        raise ConfigError("no p-values to combine; a guard needs at least one detector")
    return np.clip(np.stack([np.asarray(v, dtype=np.float64) for v in pvalues.values()]), P_FLOOR, 1.0)


class Combination(ABC):
    """A rule that turns (detectors x inputs) p-values into one score per input."""

    name: ClassVar[str]

    @abstractmethod
    def statistic(self, p: np.ndarray) -> np.ndarray:
        """The score of each column of `p` (detectors x inputs, floored at P_FLOOR); higher = more suspicious."""

    def __call__(self, pvalues: dict[str, np.ndarray]) -> np.ndarray:
        return self.statistic(_stacked(pvalues))


class Fisher(Combination):
    """-2 sum(ln p)."""

    name = "fisher"

    def statistic(self, p: np.ndarray) -> np.ndarray:
        return -2.0 * np.sum(np.log(p), axis=0)


class Cauchy(Combination):
    """The Cauchy combination: mean over detectors of tan((1/2 - min(p, 1/2)) pi), equal weights."""

    name = "cauchy"

    def statistic(self, p: np.ndarray) -> np.ndarray:
        p = np.minimum(p, 0.5)
        small = p < _CAUCHY_SMALL
        t = np.where(small, 1.0 / (np.maximum(p, P_FLOOR) * np.pi), np.tan((0.5 - np.where(small, 0.5, p)) * np.pi))
        return np.mean(t, axis=0)


class HarmonicMean(Combination):
    """-ln of the harmonic-mean p-value: ln(mean(1/p)), computed in log space."""

    name = "hmp"

    def statistic(self, p: np.ndarray) -> np.ndarray:
        neg_log = -np.log(p)
        top = neg_log.max(axis=0)
        return top + np.log(np.mean(np.exp(neg_log - top), axis=0))


class MinP(Combination):
    """-ln(min p)."""

    name = "min_p"

    def statistic(self, p: np.ndarray) -> np.ndarray:
        return -np.log(p.min(axis=0))


COMBINATIONS: dict[str, type[Combination]] = {cls.name: cls for cls in (Fisher, Cauchy, HarmonicMean, MinP)}
DEFAULT_COMBINATION = Fisher.name


def check_combination(name: object, where: str = "combination") -> str:
    """`name` if it names a registered rule, else a `ConfigError` listing them."""
    if not isinstance(name, str) or name not in COMBINATIONS:
        raise ConfigError(f"{where} is {name!r}; expected one of {', '.join(COMBINATIONS)}")
    return name


def make_combination(name: str) -> Combination:
    """The rule registered as `name`."""
    return COMBINATIONS[check_combination(name)]()
