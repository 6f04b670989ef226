"""The probe (one forward pass with hooks), threshold calibration and detection metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from malex.calibration import Threshold, calibrate
from malex.errors import ConfigError, InputError
from malex.metrics import auroc, evaluate_scores, roc, tpr_at_fpr
from malex.probe import Observation, Probe, default_layers, observe

# ---------------------------------------------------------------------------------------------------- probe


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_default_layers_are_the_declared_probe_points(digits_model):
    assert default_layers(digits_model) == ["features.4", "head.2", "head.4"]
    plain = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 3))
    # a model without declared probe layers: traced stage outputs (anatomy.stage_layers), here only the
    # activation that the dense layer reads, not the raw conv and dense outputs
    assert default_layers(plain) == ["3:in"]


def test_probe_captures_named_layers_with_shapes(digits_model):
    x = torch.rand(6, 1, 8, 8)
    digits_model.eval()  # the reference below runs the model directly; dropout must be off
    obs = Probe(digits_model).run(x)
    assert len(obs) == 6 and torch.equal(obs.x, x)
    assert obs.features["features.4"].shape == (6, 64, 4, 4)
    assert obs.features["head.2"].shape == (6, 256)
    assert obs.features["head.4"].shape == (6, 10)
    with torch.no_grad():
        feats = digits_model.features(digits_model.normalize(x))
        hidden = digits_model.head[2](digits_model.head[1](digits_model.head[0](feats)))
        logits = digits_model(x)
    assert torch.allclose(obs.layer("features.4"), feats, atol=1e-6)
    assert torch.allclose(obs.layer("head.2"), hidden, atol=1e-6)
    assert torch.allclose(obs.logits, logits, atol=1e-6)
    assert torch.equal(obs.layer("head.4"), obs.logits)  # the last layer's output is the logits
    assert torch.equal(obs.pred, logits.argmax(1))
    assert _no_hooks(digits_model)


def test_input_suffix_captures_module_input(digits_model):
    x = torch.rand(5, 1, 8, 8)
    obs = Probe(digits_model, ["head:in", "head.1:in", "features.4"]).run(x)
    assert list(obs.features) == ["head:in", "head.1:in", "features.4"]
    assert torch.equal(obs.layer("head:in"), obs.layer("features.4"))  # what enters the head
    assert obs.layer("head.1:in").shape == (5, 64 * 4 * 4)  # what leaves the flatten
    assert torch.equal(obs.layer("head.1:in"), obs.layer("head:in").flatten(1))
    # re-running just the head on its captured input gives the logits
    with torch.no_grad():
        assert torch.allclose(digits_model.head.eval()(obs.layer("head:in")), obs.logits, atol=1e-6)


def test_hooks_removed_after_pass_and_after_error(digits_model):
    probe = Probe(digits_model, ["features.0", "head:in"])
    probe.run(torch.rand(3, 1, 8, 8))
    assert _no_hooks(digits_model)
    with pytest.raises(RuntimeError):
        probe.run(torch.rand(3, 2, 8, 8))  # wrong channel count fails inside the forward
    assert _no_hooks(digits_model)


def test_unknown_layer_rejected(digits_model):
    with pytest.raises(ConfigError, match="model has no layer 'head.9'") as info:
        Probe(digits_model, ["features.0", "head.9"])
    assert "features.0" in str(info.value)  # lists the layers there are
    with pytest.raises(ConfigError, match="model has no layer 'nope'"):
        Probe(digits_model, ["nope:in"])
    obs = observe(digits_model, torch.rand(2, 1, 8, 8), ["head.1"])
    with pytest.raises(ConfigError, match="was not captured"):
        obs.layer("head.2")


def test_batching_gives_same_result(digits_model):
    x = torch.rand(23, 1, 8, 8)
    layers = ["features.1", "head:in", "head.2"]
    one = Probe(digits_model, layers).run(x, batch_size=1000)
    many = Probe(digits_model, layers).run(x, batch_size=5)
    assert torch.equal(many.x, x)
    assert torch.allclose(one.logits, many.logits, atol=1e-5)
    for name in layers:
        assert many.layer(name).shape == one.layer(name).shape
        assert torch.allclose(one.layer(name), many.layer(name), atol=1e-5)


@pytest.mark.parametrize("training", [True, False])
def test_probe_restores_mode_and_leaves_model_unchanged(digits_model, training):
    state = {k: v.clone() for k, v in digits_model.state_dict().items()}
    x = torch.rand(8, 1, 8, 8)
    digits_model.train(training)
    a = Probe(digits_model).run(x)
    b = Probe(digits_model).run(x)
    assert digits_model.training is training
    assert all(m.training is training for m in digits_model.modules())
    assert torch.equal(a.logits, b.logits)  # eval mode during the pass: dropout off
    assert all(torch.equal(state[k], v) for k, v in digits_model.state_dict().items())


def test_observation_subset_and_concat(digits_model):
    obs = Probe(digits_model, ["head.2", "head:in"]).run(torch.rand(10, 1, 8, 8))
    idx = torch.tensor([7, 2, 2])
    sub = obs.subset(idx)
    assert len(sub) == 3
    assert torch.equal(sub.x, obs.x[idx]) and torch.equal(sub.logits, obs.logits[idx])
    for k in obs.features:
        assert torch.equal(sub.features[k], obs.features[k][idx])
    joined = Observation.concat([obs.subset(slice(0, 4)), obs.subset(slice(4, 10))])
    assert torch.equal(joined.x, obs.x) and torch.equal(joined.logits, obs.logits)
    assert list(joined.features) == list(obs.features)
    assert all(torch.equal(joined.features[k], obs.features[k]) for k in obs.features)


# ---------------------------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("fpr", [0.0, 0.01, 0.05, 0.1, 0.37, 0.5])
@pytest.mark.parametrize("kind", ["continuous", "ties"])
def test_calibrate_meets_fpr_with_smallest_threshold(fpr, kind):
    rng = np.random.default_rng(1)
    scores = rng.normal(size=301) if kind == "continuous" else rng.integers(0, 6, size=301).astype(float)
    th = calibrate(scores, fpr)
    assert th.fpr == fpr
    assert th.flags(scores).mean() <= fpr
    # any smaller threshold flags more than the target share of clean inputs
    below = Threshold(float(np.nextafter(th.value, -np.inf)), fpr)
    assert below.flags(scores).mean() > fpr
    assert th.value in scores


def test_calibrate_exact_quantile():
    scores = np.arange(100, dtype=float)[::-1]  # order does not matter
    th = calibrate(scores, 0.05)
    assert th.value == 94.0
    assert th.flags(scores).sum() == 5
    assert calibrate(scores, 0.0).value == 99.0
    assert Threshold(2.0, 0.1).flags([1.0, 2.0, 2.5]).tolist() == [False, False, True]  # strictly above


@pytest.mark.parametrize("fpr", [-0.01, 1.0, 1.5, float("nan")])
def test_calibrate_invalid_fpr(fpr):
    with pytest.raises(ConfigError, match="false-positive rate"):
        calibrate(np.arange(10.0), fpr)


@pytest.mark.parametrize("scores", [[0.1, np.nan, 0.3], [0.1, np.inf], [], [-np.inf, 1.0]])
def test_calibrate_bad_scores(scores):
    with pytest.raises(InputError):
        calibrate(np.array(scores, dtype=float), 0.05)


# -------------------------------------------------------------------------------------------------- metrics


def test_auroc_separated_reversed_identical():
    clean, malicious = np.linspace(0, 1, 50), np.linspace(2, 3, 30)
    assert auroc(clean, malicious) == 1.0
    assert auroc(malicious, clean) == 0.0
    assert auroc(np.full(20, 0.3), np.full(15, 0.3)) == 0.5
    assert auroc([0.0, 2.0], [1.0, 3.0]) == pytest.approx(0.75)  # 3 of 4 pairs ordered right
    fpr, tpr = roc(clean, malicious)
    assert fpr[0] == 0.0 and tpr[-1] == 1.0 and (np.diff(fpr) >= 0).all()


def test_tpr_at_fpr():
    clean = np.arange(100, dtype=float)  # threshold at 5% FPR: 94
    malicious = np.array([50.5, 94.0, 96.5, 99.5, 200.0])
    assert tpr_at_fpr(clean, malicious, 0.05) == pytest.approx(3 / 5)
    assert tpr_at_fpr(clean, malicious, 0.0) == pytest.approx(2 / 5)  # above 99: 99.5 and 200
    assert tpr_at_fpr(clean, malicious, 0.5) == pytest.approx(5 / 5)  # above 49: all


def test_evaluate_scores_arithmetic():
    clean = np.array([0.0, 1.0, 2.0, 3.0])
    malicious = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    m = evaluate_scores(clean, malicious, Threshold(2.5, 0.05))
    assert m.n_clean == 4 and m.n_malicious == 6
    assert m.clean_pass == pytest.approx(0.75)  # 3.0 is flagged
    assert m.malicious_caught == pytest.approx(4 / 6)  # 3, 4, 5, 6
    assert m.detection_accuracy == pytest.approx((3 + 4) / 10)
    assert m.auroc == pytest.approx(auroc(clean, malicious))
    assert m.tpr_at_5fpr == pytest.approx(tpr_at_fpr(clean, malicious, 0.05))
    d = m.as_dict()
    assert d["detection_accuracy"] == pytest.approx(0.7) and d["n_clean"] == 4


@pytest.mark.parametrize("clean, malicious", [
    ([0.1, np.nan], [0.5]), ([0.1], [np.inf]), ([], [0.5]), ([0.1], []),
])
def test_metrics_reject_bad_scores(clean, malicious):
    with pytest.raises(InputError):
        evaluate_scores(np.array(clean), np.array(malicious), Threshold(0.2, 0.05))
    with pytest.raises(InputError):
        auroc(np.array(clean), np.array(malicious))


def test_nan_scores_are_flagged_not_passed():
    from malex.calibration import Threshold

    flags = Threshold(0.5, 0.05).flags(np.array([0.1, np.nan, 0.9]))
    assert flags.tolist() == [False, True, True]
