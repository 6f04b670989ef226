"""Adaptive attacks: detector-aware PGD, Orthogonal PGD and CW against a guard's differentiable evidence.

On the session's digits CNN (tests/conftest.py), a one-detector guard (Mahalanobis, 5% FPR, fitted on the clean
validation split) is attacked at eps 0.3 (30 steps of 0.03). Measured when written: plain PGD is flagged on 61%
of 150 sources (Mahalanobis AUROC 0.95 on its successful examples), adaptive and orthogonal PGD on none of them
(AUROC 0.52-0.53); attacker success (fooled and not flagged) 0.39 vs 0.99; adaptive CW (2 x 40 Adam steps, 60
sources) about 0.9 with AUROC about 0.6. The bounds below leave room.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from malex.attacks.adversarial import PGD, AdaptivePGD, AdaptivePGDConfig, PGDConfig, make_adversarial
from malex.errors import ConfigError
from malex.guard import Guard, GuardConfig
from malex.guard.surrogate import GuardEvidence, gradient_check, rank_agreement, surrogate_for
from malex.metrics import auroc

EPS = 0.3


@pytest.fixture(scope="module")
def guarded(poisoned_digits):
    """A Mahalanobis-only guard on the session's digits model, its evidence, and 150 correctly classified inputs."""
    p = poisoned_digits
    guard = Guard(p["model"], GuardConfig(detectors=("mahalanobis",), progress=False)).fit(p["data"].val.x,
                                                                                        p["data"].val.y)
    x, y = p["correct"].x[:150], p["correct"].y[:150]
    return {"model": p["model"], "guard": guard, "evidence": GuardEvidence(guard), "x": x, "y": y}


def attacker_success(guard: Guard, result) -> float:
    """Share of the attacked inputs that fool the model and pass the guard at its calibrated threshold."""
    return float((result.success.numpy() & ~guard.screen(result.x_adv).flagged).mean())


def test_without_evidence_the_ce_variant_is_plain_pgd(guarded):
    """The sanity check of the adaptive-attack literature: against no detector it is plain PGD (bit for bit)."""
    m, x, y = guarded["model"], guarded["x"][:40], guarded["y"][:40]
    plain = PGD(PGDConfig(eps=EPS, alpha=0.03, steps=10)).run(m, x, y, progress=False)
    config = AdaptivePGDConfig(eps=EPS, alpha=0.03, steps=10, loss="ce", step_decay=False)
    adaptive = AdaptivePGD(config).run(m, x, y, progress=False)
    assert torch.equal(plain.x_adv, adaptive.x_adv)
    assert plain.success_rate == adaptive.success_rate > 0.9


ADAPTIVE = {
    "adaptive_pgd": {"eps": EPS, "steps": 30, "evidence_margin": 5.0},
    "orthogonal_pgd": {"eps": EPS, "steps": 30, "evidence_margin": 5.0},
    "adaptive_cw": {"steps": 40, "binary_search_steps": 2, "lr": 0.1, "c": 5.0, "evidence_margin": 5.0},
}


@pytest.mark.parametrize("name", list(ADAPTIVE))
def test_adaptive_attack_evades_mahalanobis_that_plain_pgd_does_not(guarded, name):
    n = 60 if name == "adaptive_cw" else 150  # CW's Adam steps cost more
    g, m, x, y = guarded["guard"], guarded["model"], guarded["x"][:n], guarded["y"][:n]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    grads = [None if q.grad is None else q.grad.clone() for q in m.parameters()]
    clean = g.screen(x).scores["mahalanobis"]
    plain = make_adversarial("pgd", eps=EPS, alpha=0.03, steps=30).run(m, x, y, progress=False)
    attack = make_adversarial(name, **ADAPTIVE[name]).against(guarded["evidence"])
    adaptive = attack.run(m, x, y, progress=False)

    def detector_auroc(result) -> float:
        return auroc(clean, g.screen(result.successful()).scores["mahalanobis"])

    assert plain.success_rate == 1.0 and adaptive.success_rate >= 0.8
    assert detector_auroc(plain) >= 0.9
    assert detector_auroc(adaptive) <= 0.7
    assert attacker_success(g, adaptive) >= attacker_success(g, plain) + 0.4
    if name != "adaptive_cw":  # CW is an L2 attack without a budget
        assert adaptive.linf.max() <= EPS + 1e-6
    # the guarded model is left as it was: same weights, no gradient accumulated into .grad, still in eval mode
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert all((g0 is None and q.grad is None) or torch.equal(g0, q.grad) for g0, q in zip(grads, m.parameters()))
    assert not m.training


def test_surrogate_ranks_as_the_detector_and_has_correct_gradients(poisoned_digits, guarded):
    p = poisoned_digits
    # kd_bu without its Monte-Carlo-dropout column, which the surrogate passes by value (no gradient)
    config = GuardConfig(detectors=("mahalanobis", "mutation_adv", "lid", "kd_bu"),
                         settings={"kd_bu": {"use_bu": False}}, progress=False)
    guard = Guard(p["model"], config).fit(p["data"].val.x, p["data"].val.y)
    evidence = GuardEvidence(guard)
    x = torch.cat([guarded["x"][:60], p["pgd_stop"][:60]])
    agreement = rank_agreement(evidence, x)
    for exact in ("mahalanobis", "lid", "kd_bu"):  # the same scores, computed differentiably
        assert agreement[exact] > 0.999
    assert agreement["mutation_adv"] > 0.5  # 20 soft mutants against up to 100 hard ones
    assert agreement["guard"] > 0.7
    assert gradient_check(guard, x[:1]) == {name: True for name in ("guard", *config.detectors)}


def test_bad_evidence_and_unsupported_detectors_are_clear_errors(poisoned_digits, guarded):
    m, x, y = guarded["model"], guarded["x"][:4], guarded["y"][:4]
    with pytest.raises(ConfigError, match="one value per input"):
        AdaptivePGD(evidence=lambda t: t.flatten(1).sum()).run(m, x, y, progress=False)
    with pytest.raises(ConfigError, match="expected a callable"):
        AdaptivePGD(evidence=np.zeros(3))
    with pytest.raises(ConfigError, match="loss"):
        AdaptivePGDConfig(loss="hinge")
    strip = Guard(m, GuardConfig(detectors=("strip",), progress=False)).fit(
        poisoned_digits["data"].val.x, poisoned_digits["data"].val.y)
    with pytest.raises(ConfigError, match="no differentiable surrogate"):
        surrogate_for(strip.detectors["strip"])


def test_gradient_check_catches_a_score_passed_without_gradient(poisoned_digits, guarded):
    """With its MC-dropout column (a value without a gradient in the surrogate), kd_bu's surrogate fails the check."""
    p = poisoned_digits
    guard = Guard(p["model"], GuardConfig(detectors=("kd_bu",), progress=False)).fit(p["data"].val.x, p["data"].val.y)
    assert guard.detectors["kd_bu"].use_bu_
    assert gradient_check(guard, guarded["x"][:1]) == {"guard": False, "kd_bu": False}


def test_feature_matching_passes_mahalanobis_more_often_than_plain_pgd(poisoned_digits, guarded):
    """The second family: no detector knowledge, only clean guides. Measured when written on 100 sources at eps 0.3:
    fooled 0.82, attacker success 0.59 against plain PGD's 0.39."""
    g, m, x, y = guarded["guard"], guarded["model"], guarded["x"][:100], guarded["y"][:100]
    data = poisoned_digits["data"]
    plain = make_adversarial("pgd", eps=EPS, alpha=0.03, steps=30).run(m, x, y, progress=False)
    matched = make_adversarial("feature_matching", eps=EPS, steps=30).toward(data.val.x, data.val.y).run(
        m, x, y, progress=False)
    assert matched.success_rate >= 0.7 and matched.linf.max() <= EPS + 1e-6
    assert attacker_success(g, matched) >= attacker_success(g, plain) + 0.1
    with pytest.raises(ConfigError, match="no guides"):
        make_adversarial("feature_matching").run(m, x[:2], y[:2], progress=False)
    with pytest.raises(ConfigError, match="guide of a class"):
        make_adversarial("feature_matching").toward(data.val.x[:5], torch.zeros(5, dtype=torch.long)).run(
            m, x[:4], torch.zeros(4, dtype=torch.long), progress=False)
