"""Backdoor triggers (BadNets, Blend, Watermark), poisoning, the attack success rate, the successful trigger
inputs, and (poisoned) training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from malex.attacks.backdoor import (
    TRIGGERS, BadNets, BadNetsConfig, Blend, BlendConfig, PoisonConfig, Watermark, WatermarkConfig,
    attack_success_rate, make_trigger, poison_split, ring_logo, successful_triggered, train_model, triggered_inputs,
)
from malex.data.dataset import Dataset, Split
from malex.errors import ConfigError
from malex.models import build_model
from malex.models.inference import accuracy
from malex.models.train import TrainConfig, train_classifier

# -------------------------------------------------------------------------------------------------- BadNets


@pytest.mark.parametrize("corner, rows, cols", [
    ("bottom-right", (5, 9), (7, 11)),
    ("bottom-left", (5, 9), (1, 5)),
    ("top-right", (1, 5), (7, 11)),
    ("top-left", (1, 5), (1, 5)),
])
def test_badnets_stamps_size_square_at_corner_with_margin(corner, rows, cols):
    x = torch.zeros(2, 3, 10, 12)
    out = BadNets(BadNetsConfig(size=4, corner=corner, margin=1, colour=0.75)).apply(x)
    expected = torch.zeros_like(x)
    expected[:, :, rows[0] : rows[1], cols[0] : cols[1]] = 0.75
    assert torch.equal(out, expected)
    assert int((out != x).sum()) == 2 * 3 * 4 * 4  # exactly size x size pixels per channel and image


def test_badnets_default_is_study_trigger_and_margin_zero_touches_edge():
    x = torch.full((1, 1, 8, 8), 0.2)
    out = BadNets().apply(x)  # 4x4 white, bottom-right, 1 px margin
    assert torch.equal(out[0, 0, 3:7, 3:7], torch.ones(4, 4))
    changed = out != x
    assert int(changed.sum()) == 16 and not changed[0, 0, 7, :].any() and not changed[0, 0, :, 7].any()
    edge = BadNets(BadNetsConfig(size=2, margin=0)).apply(x)
    assert torch.equal(edge[0, 0, 6:, 6:], torch.ones(2, 2)) and int((edge != x).sum()) == 4


def test_badnets_does_not_modify_input():
    x = torch.rand(3, 1, 8, 8)
    before = x.clone()
    out = BadNets(BadNetsConfig(size=2)).apply(x)
    assert torch.equal(x, before)
    assert out.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("cfg", [
    BadNetsConfig(size=0), BadNetsConfig(margin=-1), BadNetsConfig(colour=1.5), BadNetsConfig(colour=-0.1),
    BadNetsConfig(corner="middle"),
])
def test_badnets_out_of_range_config(cfg):
    with pytest.raises(ConfigError):
        BadNets(cfg)


def test_badnets_patch_too_big_for_image():
    with pytest.raises(ConfigError, match="does not fit a 8x8 image"):
        BadNets(BadNetsConfig(size=8, margin=1)).apply(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ConfigError, match="does not fit"):
        BadNets(BadNetsConfig(size=4, margin=1)).apply(torch.zeros(1, 1, 4, 16))  # too short
    out = BadNets(BadNetsConfig(size=7, margin=1)).apply(torch.zeros(1, 1, 8, 8))  # fits exactly
    assert int(out.sum()) == 49 and float(out[0, 0, -1].sum()) == 0.0 and float(out[0, 0, :, -1].sum()) == 0.0


# ---------------------------------------------------------------------------------------------------- Blend


def test_blend_mixes_pattern_at_alpha():
    x = torch.rand(4, 3, 6, 6)
    trig = Blend(BlendConfig(alpha=0.3, seed=2))
    pattern = trig.pattern((3, 6, 6))
    assert pattern.shape == (3, 6, 6) and float(pattern.min()) >= 0 and float(pattern.max()) <= 1
    out = trig.apply(x)
    assert torch.allclose(out, 0.7 * x + 0.3 * pattern, atol=1e-6)
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert not torch.equal(out[0], out[1])  # the pattern is mixed into each image, not replacing it


def test_blend_deterministic_by_seed():
    x = torch.rand(2, 1, 8, 8)
    a = Blend(BlendConfig(alpha=0.2, seed=5)).apply(x)
    b = Blend(BlendConfig(alpha=0.2, seed=5)).apply(x)
    c = Blend(BlendConfig(alpha=0.2, seed=6)).apply(x)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_blend_custom_pattern_and_alpha_one():
    pattern = torch.linspace(0, 1, 16).view(1, 4, 4)
    x = torch.rand(2, 1, 4, 4)
    before = x.clone()
    out = Blend(BlendConfig(alpha=1.0), pattern=pattern).apply(x)
    assert torch.allclose(out, pattern.expand(2, 1, 4, 4))
    assert torch.equal(x, before)
    with pytest.raises(ConfigError, match="blend pattern is"):
        Blend(BlendConfig(alpha=0.5), pattern=pattern).apply(torch.rand(1, 1, 5, 5))


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5])
def test_blend_alpha_out_of_range(alpha):
    with pytest.raises(ConfigError, match="alpha"):
        Blend(BlendConfig(alpha=alpha))


def test_blend_pattern_must_be_chw_in_unit_range():
    with pytest.raises(ConfigError):
        Blend(pattern=torch.full((1, 4, 4), 2.0))
    with pytest.raises(ConfigError):
        Blend(pattern=torch.rand(4, 4))


# ------------------------------------------------------------------------------------------------ Watermark


def test_watermark_changes_only_masked_pixels():
    mask = torch.zeros(6, 6)
    mask[1:3, 2:5] = 1.0
    x = torch.rand(3, 2, 6, 6) * 0.9
    out = Watermark(WatermarkConfig(alpha=0.5, colour=1.0), mask=mask).apply(x)
    changed = (out != x).any(dim=(0, 1))
    assert torch.equal(changed, mask.bool())
    inside = mask.bool().expand_as(x)
    assert torch.allclose(out[inside], 0.5 * x[inside] + 0.5)
    assert torch.equal(out[~inside], x[~inside])


def test_watermark_default_ring_logo():
    logo = ring_logo(16, 16)
    assert logo.shape == (16, 16)
    assert set(logo.unique().tolist()) <= {0.0, 1.0}
    assert 0 < int(logo.sum()) < 16 * 16 // 2
    x = torch.zeros(1, 1, 16, 16)
    out = Watermark().apply(x)  # alpha 0.5, white
    assert torch.equal(out[0, 0] > 0, logo.bool())
    assert torch.allclose(out[0, 0][logo.bool()], torch.tensor(0.5))


def test_watermark_invalid_settings():
    with pytest.raises(ConfigError):
        Watermark(WatermarkConfig(alpha=0.0))
    with pytest.raises(ConfigError):
        Watermark(WatermarkConfig(colour=2.0))
    with pytest.raises(ConfigError):
        Watermark(mask=torch.ones(1, 4, 4))
    with pytest.raises(ConfigError, match="watermark mask is"):
        Watermark(mask=torch.ones(4, 4)).apply(torch.zeros(1, 1, 5, 5))


# --------------------------------------------------------------------------------------------- make_trigger


def test_make_trigger_by_name():
    assert {"badnets", "blend", "watermark"} <= set(TRIGGERS)
    trig = make_trigger("badnets", size=2, margin=0)
    assert isinstance(trig, BadNets) and trig.config.size == 2 and trig.config.margin == 0
    assert trig.describe() == {"name": "badnets", "size": 2, "corner": "bottom-right", "margin": 0, "colour": 1.0}
    assert isinstance(make_trigger("blend", alpha=0.1), Blend)
    assert isinstance(make_trigger("watermark"), Watermark)


def test_make_trigger_unknown_name_or_setting():
    with pytest.raises(ConfigError, match="unknown trigger 'trojan'"):
        make_trigger("trojan")
    with pytest.raises(ConfigError, match="bad settings for trigger 'badnets'"):
        make_trigger("badnets", radius=3)
    with pytest.raises(ConfigError):
        make_trigger("blend", alpha=2.0)


# -------------------------------------------------------------------------------------------------- poisoning


def _split(n: int = 50, classes: int = 5) -> Split:
    gen = torch.Generator().manual_seed(0)
    return Split(torch.rand(n, 1, 8, 8, generator=gen) * 0.5, torch.arange(n) % classes)


def test_poison_split_poisons_rate_of_non_target_inputs():
    data = _split()
    x0, y0 = data.x.clone(), data.y.clone()
    trig = BadNets(BadNetsConfig(size=2))
    poisoned, chosen = poison_split(data, trig, PoisonConfig(rate=0.2, target=1, seed=0))
    assert len(poisoned) == len(data)
    assert len(chosen) == round(0.2 * 50) == 10
    assert len(set(chosen.tolist())) == 10
    assert (y0[chosen] != 1).all()  # only non-target inputs are poisoned
    assert (poisoned.y[chosen] == 1).all()
    assert torch.equal(poisoned.x[chosen], trig.apply(x0[chosen]))
    rest = torch.ones(len(data), dtype=torch.bool)
    rest[chosen] = False
    assert torch.equal(poisoned.x[rest], x0[rest]) and torch.equal(poisoned.y[rest], y0[rest])
    assert torch.equal(data.x, x0) and torch.equal(data.y, y0)  # the input split is untouched


def test_poison_split_deterministic_by_seed():
    data, trig = _split(), BadNets(BadNetsConfig(size=2))
    a = poison_split(data, trig, PoisonConfig(rate=0.2, target=1, seed=3))[1]
    b = poison_split(data, trig, PoisonConfig(rate=0.2, target=1, seed=3))[1]
    c = poison_split(data, trig, PoisonConfig(rate=0.2, target=1, seed=4))[1]
    assert torch.equal(a, b)
    assert set(a.tolist()) != set(c.tolist())


def test_poison_split_too_few_candidates():
    data = _split(50, 5)  # 40 non-target inputs
    with pytest.raises(ConfigError, match="cannot poison 45 of 40"):
        poison_split(data, BadNets(BadNetsConfig(size=2)), PoisonConfig(rate=0.9, target=1))
    with pytest.raises(ConfigError, match="cannot poison 0"):
        poison_split(_split(4, 2), BadNets(BadNetsConfig(size=2)), PoisonConfig(rate=0.1, target=1))


@pytest.mark.parametrize("bad", [dict(rate=0.0), dict(rate=1.0), dict(rate=-0.5), dict(target=-1)])
def test_poison_config_out_of_range(bad):
    with pytest.raises(ConfigError):
        PoisonConfig(**bad)


def test_triggered_inputs_excludes_target_class():
    data = _split(20, 4)
    trig = BadNets(BadNetsConfig(size=2))
    out = triggered_inputs(data, trig, target=2)
    keep = data.y != 2
    assert len(out) == int(keep.sum()) == 15
    assert (out.y != 2).all() and torch.equal(out.y, data.y[keep])  # labels stay the truth
    assert torch.equal(out.x, trig.apply(data.x[keep]))


# ----------------------------------------------------------------------------------- attack success rate


class _Always(nn.Module):
    """Test double: predicts `label` for every input."""

    def __init__(self, label: int, classes: int = 5) -> None:
        super().__init__()
        self.label, self.classes = label, classes

    def forward(self, x):
        return nn.functional.one_hot(torch.full((x.shape[0],), self.label), self.classes).float()


class _SeesPatch(nn.Module):
    """Test double: predicts `target` when the bottom-right pixel is white, else class 0."""

    def __init__(self, target: int, classes: int = 5) -> None:
        super().__init__()
        self.target, self.classes = target, classes

    def forward(self, x):
        labels = torch.where(x[:, 0, -1, -1] == 1.0, self.target, 0)
        return nn.functional.one_hot(labels, self.classes).float()


def test_attack_success_rate_extremes():
    data, trig = _split(), BadNets(BadNetsConfig(size=2, margin=0))
    assert attack_success_rate(_Always(3), data, trig, target=3) == 1.0
    assert attack_success_rate(_Always(0), data, trig, target=3) == 0.0


def test_attack_success_rate_counts_only_non_target_triggered_inputs():
    data, trig = _split(), BadNets(BadNetsConfig(size=2, margin=0))
    assert attack_success_rate(_SeesPatch(2), data, trig, target=2) == 1.0
    # with a trigger the model does not react to, nothing succeeds
    other = BadNets(BadNetsConfig(size=2, margin=0, corner="top-left"))
    assert attack_success_rate(_SeesPatch(2), data, other, target=2) == 0.0
    # a model that predicts class 0 for everything succeeds only if 0 is the target; target-0 inputs are excluded
    assert attack_success_rate(_Always(0), data, other, target=0) == 1.0


class _SeesPatchWhenBright(nn.Module):
    """Test double: predicts `target` when the bottom-right pixel is white and the top-left one above 0.25."""

    def __init__(self, target: int, classes: int = 5) -> None:
        super().__init__()
        self.target, self.classes = target, classes

    def forward(self, x):
        labels = torch.where((x[:, 0, -1, -1] == 1.0) & (x[:, 0, 0, 0] > 0.25), self.target, 0)
        return nn.functional.one_hot(labels, self.classes).float()


def test_successful_triggered_keeps_the_non_target_inputs_the_model_sends_to_the_target():
    data, trig = _split(), BadNets(BadNetsConfig(size=2, margin=0))
    got = successful_triggered(_SeesPatchWhenBright(2), data, trig, target=2)
    expected = torch.nonzero((data.y != 2) & (data.x[:, 0, 0, 0] > 0.25)).flatten()
    assert 0 < len(expected) < 40
    assert torch.equal(got.source_index, expected)
    assert torch.equal(got.x, trig.apply(data.x[expected]))
    assert torch.equal(got.label, torch.full((len(expected),), 2))
    assert got.summary == {"success_rate": pytest.approx(len(expected) / 40), "n": len(expected), "n_tried": 40}
    first = successful_triggered(_SeesPatchWhenBright(2), data, trig, target=2, limit=3)
    assert torch.equal(first.source_index, expected[:3]) and torch.equal(first.x, got.x[:3])
    assert first.summary["n"] == 3 and first.summary["n_tried"] == 40  # the rate still covers every input
    none = successful_triggered(_Always(0), data, trig, target=2)
    assert len(none) == 0 and none.summary["success_rate"] == 0.0 and none.x.shape == (0, 1, 8, 8)
    with pytest.raises(ConfigError, match="limit"):
        successful_triggered(_Always(0), data, trig, target=2, limit=0)


# ---------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def small_digits(digits):
    """The digits with a 300-input training split: quick to train on."""
    return Dataset(digits.name, digits.train.subset(slice(0, 300)), digits.val, digits.test, digits.num_classes)


FAST = TrainConfig(epochs=2, shift=1, seed=3)


def test_train_model_matches_seeding_building_poisoning_and_training_by_hand(small_digits):
    trig, poison = BadNets(BadNetsConfig(size=2, margin=0)), PoisonConfig(rate=0.1, target=1, seed=5)
    got = train_model(small_digits, "digits_cnn", FAST, trig, poison, progress=False)
    torch.manual_seed(FAST.seed)
    model = build_model("digits_cnn", small_digits.image_shape, small_digits.num_classes)
    train_classifier(model, poison_split(small_digits.train, trig, poison)[0], FAST, progress=False)
    mine, theirs = got.model.state_dict(), model.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert not got.model.training
    assert got.clean_accuracy == accuracy(model, small_digits.test.x, small_digits.test.y)
    assert got.attack_success_rate == attack_success_rate(model, small_digits.test, trig, 1)
    assert got.target == 1 and got.trigger is trig and got.poison == poison
    assert got.seconds > 0 and got.cpu_seconds > 0
    assert got.info() == {"trigger": trig.describe(), "target": 1, "rate": 0.1,
                          "clean_accuracy": got.clean_accuracy, "attack_success_rate": got.attack_success_rate}


def test_train_model_clean_and_seeds(small_digits):
    clean = train_model(small_digits, "digits_cnn", FAST, progress=False)
    assert clean.attack_success_rate is None and clean.trigger is None and clean.target is None
    assert clean.info() == {"clean_accuracy": clean.clean_accuracy} and clean.arch == "digits_cnn"
    again = train_model(small_digits, "digits_cnn", FAST, progress=False).model.state_dict()
    other_init = train_model(small_digits, "digits_cnn", FAST, init_seed=4, progress=False).model.state_dict()
    first = clean.model.state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other_init[k]) for k in first)


def test_train_model_rejects_half_a_backdoor_and_a_target_outside_the_classes(small_digits):
    trig = BadNets(BadNetsConfig(size=2, margin=0))
    with pytest.raises(ConfigError, match="both"):
        train_model(small_digits, "digits_cnn", FAST, trig, progress=False)
    with pytest.raises(ConfigError, match="both"):
        train_model(small_digits, "digits_cnn", FAST, poison=PoisonConfig(), progress=False)
    with pytest.raises(ConfigError, match="0..9"):
        train_model(small_digits, "digits_cnn", FAST, trig, PoisonConfig(target=10), progress=False)
    with pytest.raises(ConfigError, match="architecture"):
        train_model(small_digits, "resnet9000", FAST, progress=False)
