"""Learned typing: which pattern of per-detector evidence means "adversarial" and which "backdoor".

The evidence rule (`malex.guard.verdict.evidence_kinds`) looks at two small groups of detectors only. Here every
detector's p-value counts: a logistic regression on the features -ln p (one per detector, clipped at
`MAX_EVIDENCE`, standardised) is fitted at fit time on examples the guard makes itself
(`malex.guard.stand_ins`): adversarial examples it crafts and inputs stamped with universal triggers it
optimises. A flagged input is called backdoor when the model's probability of backdoor is above 1/2.

The fitted model is a few plain arrays (detector names in order, feature mean and scale, weights, intercept),
saved in the guard file as tensors; no pickle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from malex.detectors.base import ADVERSARIAL, BACKDOOR
from malex.errors import ConfigError
from malex.guard.combine import P_FLOOR

#: -ln p beyond this is clipped (p below about 1e-22 all count as the same, very strong, evidence)
MAX_EVIDENCE = 50.0
#: the tensors a saved kind model holds
TENSORS = ("mean", "scale", "coef", "intercept")


def evidence_features(pvalues: Mapping[str, np.ndarray], names: tuple[str, ...]) -> np.ndarray:
    """(inputs x detectors) -ln p, in the order of `names`, clipped to [0, MAX_EVIDENCE]."""
    p = np.stack([np.asarray(pvalues[n], dtype=np.float64) for n in names], axis=1)
    return np.clip(-np.log(np.maximum(p, P_FLOOR)), 0.0, MAX_EVIDENCE)


@dataclass(frozen=True)
class KindModel:
    """A logistic regression from per-detector evidence to P(backdoor | flagged input)."""

    names: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    def backdoor_probability(self, pvalues: Mapping[str, np.ndarray]) -> np.ndarray:
        z = (evidence_features(pvalues, self.names) - self.mean) / self.scale
        return 1.0 / (1.0 + np.exp(-np.clip(z @ self.coef + self.intercept, -500, 500)))

    def kinds(self, pvalues: Mapping[str, np.ndarray]) -> np.ndarray:
        """BACKDOOR where the probability of backdoor is above 1/2, else ADVERSARIAL."""
        return np.where(self.backdoor_probability(pvalues) > 0.5, BACKDOOR, ADVERSARIAL)

    def export(self) -> dict[str, torch.Tensor]:
        return {"mean": torch.from_numpy(self.mean.copy()), "scale": torch.from_numpy(self.scale.copy()),
                "coef": torch.from_numpy(self.coef.copy()),
                "intercept": torch.tensor([self.intercept], dtype=torch.float64)}

    @classmethod
    def restore(cls, names: tuple[str, ...], tensors: Mapping[str, torch.Tensor]) -> "KindModel":
        """The model saved by `export`, checked: every tensor there, float64, one value per detector."""
        missing = [k for k in TENSORS if k not in tensors]
        if missing:
            raise ConfigError(f"the learned typing lacks tensor(s) {', '.join(missing)}")
        arrays = {k: tensors[k] for k in TENSORS}
        for k, t in arrays.items():
            want = (1,) if k == "intercept" else (len(names),)
            if t.dtype != torch.float64 or tuple(t.shape) != want or not torch.isfinite(t).all():
                raise ConfigError(f"the learned typing's {k} is {t.dtype} of shape {tuple(t.shape)}; expected finite "
                                  f"float64 of shape {want}")
        if not bool((arrays["scale"] > 0).all()):
            raise ConfigError("the learned typing's scale holds values <= 0; expected positive scales")
        return cls(names, arrays["mean"].numpy(), arrays["scale"].numpy(), arrays["coef"].numpy(),
                   float(arrays["intercept"][0]))


def fit_kind_model(adversarial: Mapping[str, np.ndarray], backdoor: Mapping[str, np.ndarray],
                   names: tuple[str, ...], regularisation: float = 1.0) -> KindModel:
    """Fit on the p-values of adversarial and backdoor-like examples (classes weighed equally); `regularisation`
    is the inverse L2 strength (scikit-learn's C)."""
    a, b = evidence_features(adversarial, names), evidence_features(backdoor, names)
    if not len(a) or not len(b):
        raise ConfigError(f"learned typing needs examples of both kinds; got {len(a)} adversarial and {len(b)} "
                          "backdoor-like ones")
    x = np.concatenate([a, b])
    y = np.r_[np.zeros(len(a)), np.ones(len(b))]
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 1e-9, scale, 1.0)
    lr = LogisticRegression(C=regularisation, class_weight="balanced", max_iter=1000)
    lr.fit((x - mean) / scale, y)
    return KindModel(names, mean, scale, lr.coef_[0].astype(np.float64), float(lr.intercept_[0]))
