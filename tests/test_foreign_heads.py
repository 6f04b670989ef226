"""Models malex did not build: the dense head is found by structure (a single `nn.Linear` named `head`, a dense
layer named `fc`), mutation and MC dropout re-run only it, and the penultimate features are what the head reads.
A head whose re-run does not reproduce the model's labels falls back to the whole model, with a warning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from malex.detectors import make_detector
from malex.detectors.stats import penultimate_layer
from malex.models.anatomy import find_head, tail_chain
from malex.probe import Probe


class ResidualGAP(nn.Module):
    """Conv stem, one residual block with batch norm and GELU, global average pool, `head` = one nn.Linear."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.GELU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.GELU(),
                                   nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = nn.functional.gelu(h + self.block(h))
        return self.head(torch.flatten(self.pool(h), 1))


class SeparableFC(nn.Module):
    """3 channels, group norm, SiLU, a depthwise-separable block, dropout, and one dense layer named `fc`."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 12, 1), nn.GroupNorm(3, 12), nn.SiLU())
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(12, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.features(x).mean((2, 3))))


class ShiftedHead(ResidualGAP):
    """The forward pass reverses the head's logits: re-running `head` alone gives other labels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -super().forward(x)


def trained(model: nn.Module, channels: int) -> tuple[nn.Module, torch.Tensor]:
    """`model` fitted a little to a planted rule (class = which image quadrant is brightest), and 120 inputs."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(480, channels, 8, 8, generator=gen) * 0.5
    y = torch.randint(0, 4, (480,), generator=gen)
    for i, label in enumerate(y.tolist()):
        r, c = divmod(label, 2)
        x[i, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 0.5
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:360]), y[:360]).backward()
        opt.step()
    return model.eval(), x[360:]


def whole_model_lcr(det, model: nn.Module, x: torch.Tensor, head_name: str, mutants: int) -> torch.Tensor:
    """The label-change rate of the detector's own mutants, each applied to the whole model."""
    params = det.fuzzer.mutants(range(mutants))
    pred = model(x).argmax(1)
    with torch.no_grad():
        flips = [functional_call(model, {f"{head_name}.{k}": v[i] for k, v in params.items()}, (x,)).argmax(1) != pred
                 for i in range(mutants)]
    return torch.stack(flips).double().mean(0)


@pytest.mark.parametrize("net, channels, head_name", [(ResidualGAP, 1, "head"), (SeparableFC, 3, "fc")])
def test_mutants_rerun_only_a_foreign_head_and_flip_the_labels_the_whole_model_would(net, channels, head_name):
    model, x = trained(net(4), channels)
    det = make_detector("mutation_adv", model, max_mutants=30, sequential=False)
    assert det.layers() == [f"{head_name}:in"] and det.module is model.get_submodule(head_name)
    obs = Probe(model, det.layers()).run(x)
    det.fit(obs)
    lcr = det.test(obs, sequential=False).lcr
    assert lcr.max() > 0  # the mutants do change labels, so the comparison below means something
    reference = whole_model_lcr(det, model, x, head_name, 30).numpy()
    assert (abs(lcr - reference) <= 1 / 30 + 1e-12).all() and abs(lcr - reference).mean() < 0.01


def test_a_head_that_does_not_give_the_models_labels_falls_back_to_the_whole_model():
    model, x = trained(ShiftedHead(4), 1)
    det = make_detector("mutation_adv", model, max_mutants=20, sequential=False)
    assert det.layers() == ["head:in"]
    obs = Probe(model, det.layers()).run(x)
    with pytest.warns(UserWarning, match="whole model"):
        det.fit(obs)
    assert det.target.reach == "model" and det.layers() == [] and det.module is model
    restored = make_detector("mutation_adv", model, max_mutants=20, sequential=False).restore(*det.export())
    assert restored.target.reach == "model" and restored.layers() == []
    assert (restored.score(obs) == det.score(obs)).all()


def test_penultimate_features_are_what_the_last_dense_layer_reads():
    for net, layer, width in ((ResidualGAP, "head:in", 8), (SeparableFC, "fc:in", 12)):
        model = net(4).eval()
        assert penultimate_layer(model) == layer
        det = make_detector("mahalanobis_penultimate", model)
        assert det.layers() == [layer]
        x = torch.rand(5, 1 if net is ResidualGAP else 3, 8, 8)
        assert Probe(model, det.layers()).run(x).layer(layer).shape == (5, width)


def test_mc_dropout_reruns_only_the_modules_the_forward_pass_ends_with():
    model, x = trained(SeparableFC(4), 3)
    head = find_head(model, also=("drop",))  # `drop` and `fc` sit side by side, called in a row at the end
    assert head is not None and head.input_layer == "drop:in" and [type(m) for m in head.module] == [
        nn.Dropout, nn.Linear]
    det = make_detector("kd_bu", model)
    assert det.layers() == ["fc:in", "drop:in"]  # KD reads the pooled features; BU re-runs drop -> fc
    obs = Probe(model, det.layers()).run(x)
    det.fit(obs)
    whole = make_detector("kd_bu", model)
    whole._head = None  # the same detector re-running the whole model for its dropout passes
    whole_obs = Probe(model, whole.layers()).run(x)
    whole.fit(whole_obs)
    np.testing.assert_allclose(det.bu(obs), whole.bu(whole_obs), rtol=1e-6, atol=1e-9)
    assert det.bu(obs).max() > 0
    assert find_head(ResidualGAP(4)).name == "head"


def test_a_model_fx_cannot_trace_has_no_chain():
    class Branchy(SeparableFC):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.features(x).mean((2, 3))
            return self.fc(self.drop(h)) if float(h.sum()) > -1e9 else self.fc(h)  # data-dependent branch

    assert tail_chain(Branchy(4)) == [] and find_head(Branchy(4), also=("drop",)) is None
    assert tail_chain(SeparableFC(4)) == ["drop", "fc"]
