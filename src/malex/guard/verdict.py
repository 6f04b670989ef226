"""The kind of a flagged input (adversarial or backdoor) from its detectors' p-values.

`evidence_kinds` is the study's observation as a rule: each detector class declares what its evidence points
to (`Detector.evidence`), and a flagged input is called the kind whose detectors give the stronger evidence
(the smaller p-value); detectors of no kind flag but do not type.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from malex.detectors.base import ADVERSARIAL, BACKDOOR

BENIGN = "benign"
#: the three verdicts, in the order confusion matrices use
VERDICTS = (BENIGN, ADVERSARIAL, BACKDOOR)


def evidence_kinds(pvalues: Mapping[str, np.ndarray], evidence: Mapping[str, str | None]) -> np.ndarray:
    """ADVERSARIAL or BACKDOOR per input: the kind of the detector group with the smaller p-value (`evidence`:
    detector name -> its kind or None); adversarial when neither group has a member."""
    n = len(next(iter(pvalues.values())))
    best = {kind: np.ones(n) for kind in (ADVERSARIAL, BACKDOOR)}
    for name, p in pvalues.items():
        kind = evidence.get(name)
        if kind is not None:
            best[kind] = np.minimum(best[kind], p)
    return np.where(best[BACKDOOR] < best[ADVERSARIAL], BACKDOOR, ADVERSARIAL)


def verdicts(flagged: np.ndarray, kinds: np.ndarray) -> list[str]:
    """BENIGN where not flagged, else the input's kind."""
    return [str(k) if f else BENIGN for f, k in zip(np.asarray(flagged, bool), kinds)]
