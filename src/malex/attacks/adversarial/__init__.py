"""Adversarial attacks (FGSM, PGD, CW-L2; the detector-aware adaptive PGD, orthogonal PGD and adaptive
CW; feature matching): torch-native, batched, on inputs in [0, 1].

Build one by class (`PGD(PGDConfig(eps=0.1))`) or by name (`make_adversarial("pgd", eps=0.1)`), then
`attack.run(model, x, y)` for an untargeted run or `attack.run(model, x, y, target=t)` for a targeted one;
`craft_successful(attack, model, x, y)` keeps only the successful examples made from correctly classified inputs.
The detector-aware attacks take the defence as a plain differentiable callable, `evidence(x) -> (N,)`, positive
where it flags (`make_adversarial("adaptive_pgd", eps=0.3).against(evidence)`; the guard's is
`malex.guard.surrogate.GuardEvidence`); without one they attack the undefended model. Feature matching is given
clean guide inputs instead (`make_adversarial("feature_matching").toward(x_clean, y_clean)`).
"""

from __future__ import annotations

import dataclasses

from malex.attacks.adversarial.adaptive_cw import AdaptiveCW, AdaptiveCWConfig
from malex.attacks.adversarial.adaptive_pgd import AdaptivePGD, AdaptivePGDConfig, EvidencePGD
from malex.attacks.adversarial.base import AdversarialAttack, AdversarialResult
from malex.attacks.adversarial.cw import CW, CWConfig
from malex.attacks.adversarial.evidence import Evidence, EvidenceAware
from malex.attacks.adversarial.feature_matching import FeatureMatching, FeatureMatchingConfig
from malex.attacks.adversarial.fgsm import FGSM, FGSMConfig
from malex.attacks.adversarial.orthogonal_pgd import OrthogonalPGD
from malex.attacks.adversarial.pgd import PGD, PGDConfig
from malex.attacks.adversarial.successful import craft_successful
from malex.errors import ConfigError

ADVERSARIAL_ATTACKS: dict[str, type[AdversarialAttack]] = {
    cls.name: cls for cls in (FGSM, PGD, CW, AdaptivePGD, OrthogonalPGD, AdaptiveCW, FeatureMatching)
}


def make_adversarial(name: str, **config_kwargs: object) -> AdversarialAttack:
    """The attack registered as `name`, configured by `config_kwargs` (the fields of its config class)."""
    if name not in ADVERSARIAL_ATTACKS:
        raise ConfigError(f"unknown adversarial attack {name!r}; expected one of {', '.join(ADVERSARIAL_ATTACKS)}")
    cls = ADVERSARIAL_ATTACKS[name]
    fields = [f.name for f in dataclasses.fields(cls.config_class)]
    unknown = sorted(set(config_kwargs) - set(fields))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)} for attack {name!r}; "
                          f"expected some of {', '.join(fields)}")
    return cls(cls.config_class(**config_kwargs))


__all__ = [
    "ADVERSARIAL_ATTACKS",
    "AdaptiveCW",
    "AdaptiveCWConfig",
    "AdaptivePGD",
    "AdaptivePGDConfig",
    "Evidence",
    "EvidenceAware",
    "EvidencePGD",
    "OrthogonalPGD",
    "CW",
    "CWConfig",
    "FGSM",
    "FeatureMatching",
    "FeatureMatchingConfig",
    "FGSMConfig",
    "PGD",
    "PGDConfig",
    "AdversarialAttack",
    "AdversarialResult",
    "craft_successful",
    "make_adversarial",
]
