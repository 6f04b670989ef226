"""Model mutation on a head of one dense layer: the backdoor side fuzzes the last convolution and re-runs the
model from it (`malex.models.tail`). The cut reproduces the model, the mutants are those of the whole model, the
choice survives a save and load (older files keep their head-only mutants), and on a BadNets-poisoned residual
net with a global-pool head it separates trigger inputs where fuzzing the one dense layer does not."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from malex.attacks.backdoor import PoisonConfig, make_trigger, successful_triggered, train_model
from malex.data.dataset import stratified_split
from malex.detectors import make_detector
from malex.metrics import auroc
from malex.models.classifier import Normalize
from malex.models.inference import predict
from malex.models.tail import conv_tail
from malex.models.train import TrainConfig
from malex.probe import Probe

from test_foreign_heads import ResidualGAP, SeparableFC, ShiftedHead


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).mean((2, 3))
        return self.fc(h if h.sum() > 0 else -h)


@pytest.mark.parametrize("net, channels, inputs", [
    (ResidualGAP, 1, ("block.2", "stem.2")),  # the last conv's input, and the skip that jumps over it
    (SeparableFC, 3, ("features.3",)),
    (ShiftedHead, 1, ("block.2", "stem.2")),  # what follows the head (a sign flip) is part of the tail
])
def test_the_tail_from_the_last_convolution_gives_the_models_logits(net, channels, inputs):
    model = net(4).eval()
    tail = conv_tail(model)
    assert tail is not None and tail.inputs == inputs
    x = torch.rand(6, channels, 8, 8)
    obs = Probe(model, list(tail.inputs)).run(x)
    with torch.no_grad():
        assert torch.allclose(tail.module(*(obs.layer(n) for n in tail.inputs)), model(x), atol=1e-5)


class DropoutHead(ResidualGAP):
    """The one dense layer sits behind dropout in a Sequential `head`, as many published classifiers have it."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__(classes)
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(8, classes))


def test_a_head_of_dropout_then_one_dense_layer_counts_as_one_dense_layer():
    model = DropoutHead(4).eval()
    target = make_detector("mutation_bd", model).target
    assert target.reach == "last_conv" and target.weights == ("block.3.weight",)
    assert make_detector("mutation_bd", ResidualGAP(4)).target.reach == "last_conv"


def test_no_tail_without_a_convolution_or_a_traceable_forward_pass():
    assert conv_tail(nn.Sequential(nn.Flatten(), nn.Linear(64, 3))) is None
    assert conv_tail(Branchy()) is None
    assert make_detector("mutation_bd", Branchy()).target.reach == "head"  # falls back to the dense head


def test_tail_mutants_flip_the_labels_the_whole_mutated_model_would():
    torch.manual_seed(0)
    model = ResidualGAP(4).eval()
    det = make_detector("mutation_bd", model, max_mutants=12, sequential=False, target_clean_lcr=None, strength=0.5)
    assert det.target.reach == "last_conv" and det.target.weights == ("block.3.weight",)
    assert make_detector("mutation_adv", model).target.reach == "head"  # the adversarial side is unchanged
    x = torch.rand(40, 1, 8, 8)
    obs = Probe(model, det.layers()).run(x)
    flips = det._flips(det.inputs_of(obs), obs.pred, range(12))
    params = det.fuzzer.mutants(range(12))
    assert flips.any()  # the mutants do change labels, so the comparison means something
    with torch.no_grad():
        for i in range(12):
            whole = functional_call(model, {k: v[i] for k, v in params.items()}, (x,)).argmax(1)
            assert torch.equal(flips[i], whole != obs.pred)


def test_the_reach_is_saved_and_files_without_it_keep_their_head_only_mutants():
    torch.manual_seed(0)
    model = ResidualGAP(4).eval()
    x = torch.rand(60, 1, 8, 8)
    det = make_detector("mutation_bd", model, max_mutants=20)
    obs = Probe(model, det.layers() + ["head:in"]).run(x)
    det.fit(obs)
    meta, tensors = det.export()
    assert meta["values"]["reach_"] == "last_conv"
    restored = make_detector("mutation_bd", model, max_mutants=20).restore(meta, tensors)
    assert restored.target.reach == "last_conv" and (restored.score(obs) == det.score(obs)).all()

    head_only = make_detector("mutation_bd", model, max_mutants=20, through_last_conv=False).fit(obs)
    old_meta, old_tensors = head_only.export()
    for key in ("kinds", "values"):
        del old_meta[key]["reach_"]  # as written before the reach was saved
    old = make_detector("mutation_bd", model, max_mutants=20).restore(old_meta, old_tensors)
    assert old.target.reach == "head" and old.layers() == ["head:in"]
    assert (old.score(obs) == head_only.score(obs)).all()


def test_on_a_one_dense_head_fuzzing_the_last_convolution_finds_the_planted_trigger(digits):
    """BadNets on a residual net with a global-pool head: the dense layer alone gives about chance, the last
    convolution separates trigger inputs (digits seeds 0-2: 0.42-0.64 against 0.91-0.97)."""

    def net(shape, classes):
        return nn.Sequential(Normalize([0.3], [0.4]), ResidualGAP(classes))

    trigger = make_trigger("badnets", size=2, margin=0)
    model = train_model(digits, net, TrainConfig(epochs=40, lr=0.003, shift=1, seed=0), trigger,
                        PoisonConfig(0.1, 1, 0), progress=False).model.eval()
    clean_idx, source_idx = stratified_split(digits.test.y, (0.5, 0.5), 0)
    pool, sources = digits.test.subset(clean_idx), digits.test.subset(source_idx)
    clean = pool.x[predict(model, pool.x) == pool.y]
    triggered = successful_triggered(model, sources, trigger, 1, limit=500).x
    assert len(clean) > 100 and len(triggered) > 100
    result = {}
    for through in (False, True):
        det = make_detector("mutation_bd", model, through_last_conv=through)
        probe = Probe(model, det.layers())
        det.fit(probe.run(digits.val.x))
        result[through] = auroc(det.score(probe.run(clean)), det.score(probe.run(triggered)))
    assert result[True] >= 0.85 and result[True] >= result[False] + 0.2, result
