"""SCALE-UP and IBD-PSC on a tiny BadNets-poisoned digits model trained here (pattern of test_detectors).

Measured on this fixture (seed 0, one thread): BadNets AUROC of SCALE-UP data-free 0.70, SCALE-UP
data-limited (per-class) 0.43, IBD-PSC 0.72. The bounds below leave a margin under those values. Both
methods are weak on 8x8 digits: amplifying pixels by >= 3 saturates the 16-level digits into binary
strokes that most clean digits survive (clean SPC is 1 for 60% of them), and the target class "1" is the
most scale-consistent clean class (mean SPC 0.98), so standardising by the predicted class's clean
statistics hides the trigger; and a BatchNorm-free ReLU network is nearly homogeneous in its parameters,
so IBD-PSC's amplification only sharpens the softmax (see ibd_psc.py).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from malex.detectors.ibd_psc import IBDPSC, IBDPSCConfig, amplifiable_layers
from malex.detectors.scale_up import ScaleUp, ScaleUpConfig, scaled_consistency
from malex.errors import ConfigError
from malex.metrics import auroc
from malex.probe import Probe

torch.set_num_threads(1)

TARGET = 1


@pytest.fixture(scope="module")
def setup(poisoned_digits):
    model, data = poisoned_digits["model"], poisoned_digits["data"]
    correct, backdoor = poisoned_digits["correct"], poisoned_digits["backdoor"]
    probe = Probe(model, [])
    obs = {"fit": probe.run(data.val.x), "clean": probe.run(correct.x), "backdoor": probe.run(backdoor)}
    return {"model": model, "obs": obs, "fit_y": data.val.y}


@pytest.fixture(scope="module")
def fitted(setup):
    """Each detector fitted once on the clean validation split, with its scores on clean and backdoor inputs."""
    model, obs = setup["model"], setup["obs"]
    dets = {
        "scale_up_free": ScaleUp(model, ScaleUpConfig(per_class=False)),
        "scale_up_class": ScaleUp(model, ScaleUpConfig(per_class=True)),
        "ibd_psc": IBDPSC(model, IBDPSCConfig()),
    }
    out = {}
    for name, det in dets.items():
        det.fit(obs["fit"], setup["fit_y"])
        out[name] = (det, {k: det.score(obs[k]) for k in ("clean", "backdoor")})
    return {"dets": out}


# --- separation ------------------------------------------------------------------------------------------

def test_scale_up_data_free_separates_backdoor_inputs(fitted):
    _, s = fitted["dets"]["scale_up_free"]
    assert auroc(s["clean"], s["backdoor"]) >= 0.62  # measured 0.70
    assert s["backdoor"].mean() > 0.95  # the trigger survives every amplification


def test_ibd_psc_separates_backdoor_inputs(fitted):
    det, s = fitted["dets"]["ibd_psc"]
    assert auroc(s["clean"], s["backdoor"]) >= 0.65  # measured 0.72
    assert ((s["clean"] >= 0) & (s["clean"] <= 1)).all()


def test_scale_up_per_class_standardises_by_the_predicted_class(setup, fitted):
    # BadNets AUROC of this variant is 0.43 here: the target class is itself the most scale-consistent
    # clean class, so the trigger's SPC of 1 is ordinary for it (see the module docstring).
    det, s = fitted["dets"]["scale_up_class"]
    obs = setup["obs"]
    c = obs["backdoor"].pred.numpy()
    expected = (det.spc(obs["backdoor"]) - det.spc_mean_[c]) / det.spc_std_[c]
    np.testing.assert_allclose(s["backdoor"], expected)
    z, pred = det.score(obs["fit"]), obs["fit"].pred.numpy()
    for k in np.flatnonzero(det.class_counts_ >= det.config.min_per_class):
        assert abs(z[pred == k].mean()) < 1e-9  # the fit inputs are centred within their class


# --- settings ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: ScaleUpConfig(scales=()),
    lambda: ScaleUpConfig(scales=(1.0, 3.0)),
    lambda: ScaleUpConfig(scales=(float("nan"),)),
    lambda: ScaleUpConfig(min_std=0.0),
    lambda: ScaleUpConfig(batch_size=0),
    lambda: IBDPSCConfig(amplify=1.0),
    lambda: IBDPSCConfig(amplify=float("inf")),
    lambda: IBDPSCConfig(n_models=0),
    lambda: IBDPSCConfig(xi=1.0),
    lambda: IBDPSCConfig(start=0),
])
def test_bad_settings_raise(make):
    with pytest.raises(ConfigError):
        make()


def test_start_beyond_the_model_raises(setup):
    with pytest.raises(ConfigError):
        IBDPSC(setup["model"], IBDPSCConfig(start=99)).fit(setup["obs"]["fit"].subset(slice(0, 8)))


# --- SCALE-UP details ---------------------------------------------------------------------------------------

def test_spc_is_one_when_every_scale_keeps_the_label(setup, fitted):
    # all-black and all-white images are fixed points of clip(n * x, 0, 1): every scale sees the same input
    x = torch.cat([torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8)])
    spc = scaled_consistency(setup["model"], x, (3.0, 5.0, 7.0, 9.0, 11.0))
    assert torch.equal(spc, torch.ones(4, dtype=torch.float64))
    det, _ = fitted["dets"]["scale_up_free"]
    np.testing.assert_array_equal(det.score(Probe(setup["model"], []).run(x)), np.ones(4))


# --- IBD-PSC details ----------------------------------------------------------------------------------------

def test_psc_matches_physically_amplified_copies(setup, fitted):
    det, s = fitted["dets"]["ibd_psc"]
    model, obs = setup["model"], setup["obs"]["backdoor"]
    assert det.layers_ == ["head.4", "head.1", "features.2", "features.0"]  # output first, by call order
    total = torch.zeros(len(obs), dtype=torch.float64)
    for count in det.layer_counts_:
        amplified = copy.deepcopy(model).eval()
        with torch.no_grad():
            for name in det.layers_[:count]:
                for p in amplified.get_submodule(name).parameters(recurse=False):
                    p.mul_(det.config.amplify)
            probs = torch.softmax(amplified(obs.x).double(), dim=1)
        total += probs.gather(1, obs.pred.view(-1, 1)).squeeze(1)
    np.testing.assert_allclose(s["backdoor"], (total / len(det.layer_counts_)).numpy(), rtol=1e-5, atol=1e-6)


def _bias_decided_model() -> nn.Module:
    """x -> identity -> ReLU -> logits (x0, x1 + 1): inputs (0.8, 0) are class 1 only through the bias."""
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.eye(2))
        model[2].bias.copy_(torch.tensor([0.0, 1.0]))
    return model


def test_adaptive_selection_starts_where_the_clean_error_exceeds_xi():
    # amplifying the last layer only scales the logits (no flip); amplifying both gives
    # (2.25 * 0.8, 1.5 * 1) = (1.8, 1.5): every input flips, so the start is 2 layers.
    model = _bias_decided_model()
    x = torch.tensor([[0.8, 0.0]]).repeat(10, 1)
    obs = Probe(model, []).run(x)
    assert (obs.pred == 1).all()
    det = IBDPSC(model, IBDPSCConfig(amplify=1.5, n_models=5)).fit(obs)
    assert amplifiable_layers(model, x[:1]) == ["2", "0"]
    assert det.clean_error_ == [0.0, 1.0]
    assert (det.selection_, det.start_, det.layer_counts_) == ("adaptive", 2, [2])  # fewer layers than n_models
    expected = torch.softmax(torch.tensor([1.8, 1.5], dtype=torch.float64), dim=0)[1].item()
    np.testing.assert_allclose(det.score(obs), expected, rtol=1e-6)
    fixed = IBDPSC(model, IBDPSCConfig(start=1, n_models=5)).fit(obs)
    assert (fixed.selection_, fixed.layer_counts_) == ("fixed", [1, 2])


def test_a_model_with_batchnorm_gets_only_its_batchnorm_layers_amplified():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2),
                          nn.Flatten(), nn.Linear(32, 3))
    assert amplifiable_layers(model, torch.rand(1, 1, 8, 8)) == ["4", "1"]
