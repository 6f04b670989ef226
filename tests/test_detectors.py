"""Model mutation (with its SPRT) and STRIP on a tiny BadNets-poisoned digits model trained here."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from malex.detectors import SPRT, ModelMutation, MutationConfig, Strip, StripConfig, make_detector
from malex.detectors.mutation import GaussianFuzzer
from malex.detectors.strip import entropy
from malex.errors import ConfigError
from malex.metrics import auroc
from malex.models.inference import predict
from malex.probe import Probe

TARGET = 1


@pytest.fixture(scope="module")
def setup(detection_sets):
    return detection_sets


# --- SPRT -------------------------------------------------------------------------------------------------

def test_sprt_accepts_each_hypothesis_on_clear_evidence():
    sprt = SPRT(p0=0.1, p1=0.3)
    assert sprt.decide(np.array([10]), np.array([10]))[0] == 1  # every trial a success: rate is high
    assert sprt.decide(np.array([0]), np.array([30]))[0] == -1  # no success in 30: rate is low
    assert sprt.decide(np.array([1]), np.array([3]))[0] == 0  # too little evidence either way


def test_sprt_llr_matches_the_formula():
    sprt = SPRT(p0=0.2, p1=0.5)
    expected = 3 * np.log(0.5 / 0.2) + 7 * np.log(0.5 / 0.8)
    assert sprt.llr(np.array([3]), np.array([10]))[0] == pytest.approx(expected)


def test_sprt_around_keeps_rates_inside_unit_interval_and_orders_them_by_side():
    high = SPRT.around(0.0, 0.05, suspicious_high=True)
    low = SPRT.around(0.0, 0.05, suspicious_high=False)
    assert 0 < high.p0 < high.p1 < 1 and 0 < low.p1 < low.p0 < 1
    with pytest.raises(ConfigError):
        SPRT(p0=0.3, p1=0.3)


# --- model mutation -------------------------------------------------------------------------------------

def test_mutants_are_reproducible_and_follow_the_gaussian_fuzzing_rule(setup):
    det = ModelMutation(setup["model"], MutationConfig(strength=0.5, seed=3))
    uncached = ModelMutation(setup["model"], MutationConfig(strength=0.5, seed=3, cache_mb=0))
    a, b = det.fuzzer.mutants(range(4)), uncached.fuzzer.mutants(range(4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert det.fuzzer.mutants(range(4)) is a  # kept, not drawn again
    assert uncached.fuzzer.mutants(range(4)) is not b
    w = setup["model"].head[1].weight.detach()
    noise = a["1.weight"] - w.unsqueeze(0)
    assert noise.mean().item() == pytest.approx(w.mean().item(), abs=2e-3)
    assert noise.std().item() == pytest.approx(0.5 * w.max().item(), rel=0.02)


def test_the_mutant_cache_stays_within_its_budget(setup):
    per = GaussianFuzzer(dict(setup["model"].head.named_parameters()), 0.5, 0).bytes_per_mutant
    fuzzer = GaussianFuzzer(dict(setup["model"].head.named_parameters()), 0.5, 0, cache_bytes=5 * per)
    kept = fuzzer.mutants(range(0, 4))
    assert fuzzer.mutants(range(0, 4)) is kept
    assert fuzzer.mutants(range(4, 8)) is not fuzzer.mutants(range(4, 8))  # 8 mutants would exceed 5


def test_head_only_mutants_give_the_labels_of_full_mutated_models(setup):
    model = setup["model"]
    det = ModelMutation(model, MutationConfig(strength=0.65))
    x = setup["clean"][:50]
    obs = Probe(model, det.layers()).run(x)
    flips = det._flips(det.inputs_of(obs), obs.pred, range(5))
    params = det.fuzzer.mutants(range(5))
    for i in range(5):
        mutant = copy.deepcopy(model)
        with torch.no_grad():
            for name, stacked in params.items():
                mutant.head.get_parameter(name).copy_(stacked[i])
        assert torch.equal(flips[i], predict(mutant, x) != obs.pred)


def test_batched_head_products_give_the_labels_of_functional_calls(setup, monkeypatch):
    model = setup["model"]
    det = ModelMutation(model, MutationConfig(strength=0.65))
    assert det._stackable
    obs = Probe(model, det.layers()).run(setup["clean"][:64])
    fast = det._flips(det.inputs_of(obs), obs.pred, range(10))
    monkeypatch.setattr(det, "_stackable", False)
    assert torch.equal(fast, det._flips(det.inputs_of(obs), obs.pred, range(10)))


def test_low_lcr_side_separates_backdoor_inputs(setup, fit_and_score):
    s = fit_and_score(make_detector("mutation_bd", setup["model"]), setup, kinds=("clean", "backdoor"))
    assert auroc(s["clean"], s["backdoor"]) >= 0.9


def test_high_lcr_side_separates_boundary_adversarial_examples(setup, fit_and_score):
    s = fit_and_score(make_detector("mutation_adv", setup["model"]), setup, kinds=("clean", "adversarial"))
    assert auroc(s["clean"], s["adversarial"]) >= 0.9


def test_threshold_is_calibrated_on_clean_data_and_strength_search_hits_target(setup):
    det = make_detector("mutation_bd", setup["model"], sequential=False)
    probe = Probe(setup["model"], det.layers())
    fit = probe.run(setup["fit"])
    det.fit(fit)
    lcr = det.test(fit, sequential=False).lcr
    assert np.mean(lcr < det.lcr_threshold_) <= 0.05 + 1e-9  # at most fpr of clean inputs fall below
    assert abs(lcr.mean() - 0.6) < 0.1
    assert det.strength_ != pytest.approx(0.65)  # the strength was searched, not kept


def test_sequential_test_saves_mutants_and_agrees_with_the_full_test(setup):
    det = make_detector("mutation_adv", setup["model"])
    probe = Probe(setup["model"], det.layers())
    det.fit(probe.run(setup["fit"]))
    obs = probe.run(torch.cat([setup["clean"], setup["adversarial"]]))
    seq = det.test(obs)
    full = det.test(obs, sequential=False)
    assert seq.n_mutants.mean() < 0.6 * det.config.max_mutants
    assert set(np.unique(seq.decision)) <= {-1, 1}
    full_flag = full.lcr > det.lcr_threshold_
    assert np.mean((seq.decision == 1) == full_flag) >= 0.9


def test_bad_settings_raise(setup):
    with pytest.raises(ConfigError):
        MutationConfig(strength=-1)
    with pytest.raises(ConfigError):
        MutationConfig(suspicious="sideways")
    with pytest.raises(ConfigError):
        make_detector("strip", setup["model"], n_overlays=0)


# --- STRIP ----------------------------------------------------------------------------------------------

def test_entropy_of_uniform_and_certain_predictions():
    assert entropy(torch.zeros(1, 10)).item() == pytest.approx(np.log(10))
    assert entropy(torch.tensor([[100.0, 0.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)


def test_strip_flags_trigger_inputs_as_low_entropy(setup, fit_and_score):
    s = fit_and_score(Strip(setup["model"], StripConfig(n_overlays=32)), setup, kinds=("clean", "backdoor"))
    assert auroc(s["clean"], s["backdoor"]) >= 0.75


def test_strip_scores_are_deterministic_and_fit_needs_enough_inputs(setup):
    det = Strip(setup["model"], StripConfig(n_overlays=16, seed=1))
    obs = Probe(setup["model"], []).run(setup["fit"])
    det.fit(obs)
    np.testing.assert_array_equal(det.score(obs.subset(slice(0, 20))), det.score(obs.subset(slice(0, 20))))
    with pytest.raises(ConfigError):
        Strip(setup["model"], StripConfig(n_overlays=64)).fit(obs.subset(slice(0, 10)))

