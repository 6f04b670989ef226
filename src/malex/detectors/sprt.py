"""Wald's sequential probability ratio test for a Bernoulli rate (the label-change rate).

H0: the rate is `p0` (benign); H1: the rate is `p1` (suspicious). After `n` trials with `k` successes,
the log-likelihood ratio is k log(p1/p0) + (n-k) log((1-p1)/(1-p0)); H1 is accepted once it reaches
log((1-beta)/alpha), H0 once it falls to log(beta/(1-alpha)).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from malex.errors import ConfigError

_EPS = 1e-3


@dataclass(frozen=True)
class SPRT:
    """A two-hypothesis sequential test with error rates alpha (false alarm) and beta (miss)."""

    p0: float
    p1: float
    alpha: float = 0.05
    beta: float = 0.05

    def __post_init__(self) -> None:
        if not (0 < self.p0 < 1 and 0 < self.p1 < 1) or self.p0 == self.p1:
            raise ConfigError(f"SPRT rates p0={self.p0}, p1={self.p1}; expected two different rates in (0, 1)")
        if not (0 < self.alpha < 0.5 and 0 < self.beta < 0.5):
            raise ConfigError(f"SPRT error rates alpha={self.alpha}, beta={self.beta}; expected values in (0, 0.5)")

    @classmethod
    def around(cls, threshold: float, indifference: float, suspicious_high: bool,
               alpha: float = 0.05, beta: float = 0.05) -> "SPRT":
        """Rates either side of `threshold`, `indifference` away, kept inside (0, 1)."""
        lo = min(max(threshold - indifference, _EPS), 1 - 2 * _EPS)
        hi = max(min(threshold + indifference, 1 - _EPS), lo + _EPS)
        return cls(p0=lo, p1=hi, alpha=alpha, beta=beta) if suspicious_high else cls(p0=hi, p1=lo, alpha=alpha, beta=beta)

    def llr(self, successes: np.ndarray, trials: np.ndarray) -> np.ndarray:
        """Log-likelihood ratio of H1 against H0."""
        k = np.asarray(successes, dtype=np.float64)
        n = np.asarray(trials, dtype=np.float64)
        return k * np.log(self.p1 / self.p0) + (n - k) * np.log((1 - self.p1) / (1 - self.p0))

    def decide(self, successes: np.ndarray, trials: np.ndarray) -> np.ndarray:
        """+1 where H1 (suspicious) is accepted, -1 where H0 (benign) is accepted, 0 where undecided."""
        llr = self.llr(successes, trials)
        out = np.zeros(llr.shape, dtype=np.int8)
        out[llr >= np.log((1 - self.beta) / self.alpha)] = 1
        out[llr <= np.log(self.beta / (1 - self.alpha))] = -1
        return out
