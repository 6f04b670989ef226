"""Combination rules: each calibrates to its target FPR, the sparse-evidence rules keep one strong member's
evidence that Fisher's sum dilutes, and a guard's rule survives save/load (older files read as Fisher)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from malex.calibration import calibrate
from malex.errors import ConfigError, ModelFileError
from malex.guard import Guard, GuardConfig
from malex.guard.combine import COMBINATIONS, make_combination
from malex.guard.guard import calibrate_guard, combine_pvalues
from malex.guard.pvalues import tail_pvalues

RULES = list(COMBINATIONS)


def _caught(rule: str, shifts: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """(clean FPR on fresh clean scores, share of shifted inputs caught) of a guard over len(shifts) detectors
    with standard-normal clean scores; the malicious scores of detector i are shifted by shifts[i]."""
    rng = np.random.default_rng(seed)
    k = len(shifts)
    cal = {f"d{i}": rng.normal(size=2000) for i in range(k)}
    fresh = {f"d{i}": rng.normal(size=4000) for i in range(k)}
    bad = {f"d{i}": rng.normal(size=4000) + shifts[i] for i in range(k)}
    threshold = calibrate_guard(cal, 0.05, rule)
    score = {name: combine_pvalues({d: tail_pvalues(cal[d], s[d]) for d in cal}, rule)
             for name, s in (("fresh", fresh), ("bad", bad))}
    return float(threshold.flags(score["fresh"]).mean()), float(threshold.flags(score["bad"]).mean())


@pytest.mark.parametrize("rule", RULES)
def test_every_rule_keeps_the_target_fpr_on_fresh_clean_scores(rule):
    fpr, _ = _caught(rule, np.zeros(5))
    assert 0.035 < fpr < 0.065, fpr


def test_one_strong_member_is_kept_by_cauchy_hmp_and_min_p_but_diluted_by_fisher():
    """Evidence in one of six detectors (a 3-sigma shift): Fisher adds five members' noise to it."""
    sparse = np.array([3.0, 0, 0, 0, 0, 0])
    caught = {rule: _caught(rule, sparse)[1] for rule in RULES}
    for rule in ("cauchy", "hmp", "min_p"):
        assert caught[rule] > caught["fisher"] + 0.1, caught


def test_evidence_spread_over_every_member_adds_up_under_fisher_not_under_min_p():
    spread = np.full(6, 1.0)
    caught = {rule: _caught(rule, spread)[1] for rule in RULES}
    assert caught["fisher"] > caught["min_p"] + 0.1, caught


def test_rules_are_monotone_and_finite_down_to_underflowing_pvalues():
    p = {"a": np.array([1.0, 0.5, 1e-3, 1e-30, 0.0]), "b": np.full(5, 0.5)}
    for rule in RULES:
        s = make_combination(rule)(p)
        assert np.isfinite(s).all() and np.all(np.diff(s) >= 0) and s[4] > s[3] > s[2] > s[0], (rule, s)


def test_an_unknown_rule_is_a_config_error():
    with pytest.raises(ConfigError, match="combination.*fisher"):
        GuardConfig(combination="sum")


@pytest.fixture(scope="module")
def cauchy_guard(poisoned_digits):
    data = poisoned_digits["data"]
    config = GuardConfig(detectors=("kd_bu", "mahalanobis"), combination="cauchy", progress=False)
    return Guard(poisoned_digits["model"], config).fit(data.val.x, data.val.y)


def _rewrite(src, dst, edit):
    from malex.guard.io import _digest

    with safe_open(str(src), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(meta["malex"])
    edit(header)
    save_file(tensors, str(dst), metadata={"malex": json.dumps(header), "digest": _digest(header, tensors)})
    return dst


def test_a_guard_saves_its_rule_and_loads_identically(poisoned_digits, cauchy_guard, tmp_path):
    model = poisoned_digits["model"]
    x = np.concatenate([poisoned_digits["correct"].x[:40].numpy(), poisoned_digits["backdoor"][:40].numpy()])
    loaded = Guard.load(cauchy_guard.save(tmp_path / "g.safetensors"), model)
    assert loaded.config.combination == "cauchy" and loaded.describe()["combination"] == "cauchy"
    a, b = cauchy_guard.screen(x), loaded.screen(x)
    np.testing.assert_array_equal(a.guard_score, b.guard_score)
    assert a.verdict == b.verdict
    # the threshold was calibrated on the Cauchy score, not on Fisher's
    fisher = calibrate(combine_pvalues({k: tail_pvalues(np.delete(v, 0), v[:1]) for k, v in
                                        cauchy_guard.calibration_scores_.items()}, "fisher"), 0.05)
    assert loaded.threshold_.value != fisher.value


def test_a_guard_file_without_a_rule_loads_as_fisher_and_a_foreign_rule_is_refused(poisoned_digits, cauchy_guard,
                                                                                    tmp_path):
    model = poisoned_digits["model"]
    path = cauchy_guard.save(tmp_path / "g.safetensors")
    old = _rewrite(path, tmp_path / "old.safetensors", lambda h: h["config"].pop("combination"))
    assert Guard.load(old, model).config.combination == "fisher"
    bad = _rewrite(path, tmp_path / "bad.safetensors", lambda h: h["config"].update(combination="vote"))
    with pytest.raises(ModelFileError, match="combination"):
        Guard.load(bad, model)


def test_a_wrong_way_member_does_not_cancel_the_others_under_cauchy():
    """p = 1 (a score at or below every clean one) must not outweigh another member's strong evidence."""
    strong = {"a": np.array([1e-6, 0.5]), "b": np.array([1.0, 0.5])}
    s = make_combination("cauchy")(strong)
    assert s[0] > s[1] and s[0] > 1e4
