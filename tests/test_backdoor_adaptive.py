"""Adaptive-Patch and TaCT: settings, the test-time trigger, the training-time poisoning, the source-specific
attack success rate, study configs that name them, and trained backdoors on the digits."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from malex.attacks.backdoor import (
    TRIGGERS, AdaptivePatch, AdaptivePatchConfig, BadNets, BadNetsConfig, Blend, BlendConfig, PoisonConfig, TaCT,
    TaCTConfig, attack_success_rate, make_trigger, poison_split, successful_triggered, triggered_inputs,
)
from malex.data.dataset import Split
from malex.errors import ConfigError, InputError
from malex.models import build_model
from malex.models.inference import accuracy, predict
from malex.models.train import TrainConfig, train_classifier

# 8x8 digits: 2x2 patches flush with the border (the defaults, 3x3 with a 1-pixel margin, are sized for 28x28+)
SMALL = {"size": 2, "margin": 0}


def _changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per input: whether any pixel differs."""
    return (a != b).flatten(1).any(dim=1)


def _one_line_config_error(name: str, cfg: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        make_trigger(name, **cfg)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------- registry


def test_both_triggers_are_registered_and_exported():
    import malex.attacks.backdoor as backdoor

    assert TRIGGERS["adaptive_patch"] is AdaptivePatch and TRIGGERS["tact"] is TaCT
    assert {"AdaptivePatch", "AdaptivePatchConfig", "TaCT", "TaCTConfig"} <= set(backdoor.__all__)
    assert make_trigger("adaptive_patch").describe()["name"] == "adaptive_patch"
    assert make_trigger("tact").describe()["source_classes"] == [0]


# ---------------------------------------------------------------------------------- Adaptive-Patch: settings


@pytest.mark.parametrize("cfg", [
    dict(patches=0), dict(patches=5), dict(patches=2.5), dict(size=0), dict(margin=-1), dict(placement="middle"),
    dict(alpha=0.0), dict(alpha=1.5), dict(train_alpha=0.0), dict(train_alpha=(0.5, 0.5)),
    dict(train_alpha=(0.5, 0.2, 0.5, 2.0)), dict(train_patches=0), dict(train_patches=5), dict(cover_ratio=-1.0),
    dict(cover_ratio=math.nan), dict(cover_ratio=math.inf), dict(size="3"), dict(alpha="high"), dict(seed=1.5),
])
def test_adaptive_patch_bad_settings(cfg):
    _one_line_config_error("adaptive_patch", cfg, "adaptive patch")


def test_adaptive_patch_unknown_setting_and_bad_fit():
    _one_line_config_error("adaptive_patch", {"opacity": 0.5}, "bad settings for trigger 'adaptive_patch'")
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ConfigError, match="do not fit the corners of a 8x8 image"):
        AdaptivePatch(AdaptivePatchConfig(size=4, margin=1)).apply(x)  # 2 x (4 + 1) > 8
    with pytest.raises(ConfigError, match="cannot place 9 non-overlapping"):
        AdaptivePatch(AdaptivePatchConfig(patches=9, size=3, margin=0, placement="random")).apply(x)
    with pytest.raises(ConfigError, match="patterns must be"):
        AdaptivePatch(AdaptivePatchConfig(size=2), patterns=torch.rand(3, 1, 2, 2))  # 3 patterns for 4 patches
    with pytest.raises(ConfigError, match="3 channels; images have 1"):
        AdaptivePatch(AdaptivePatchConfig(size=2, margin=0), patterns=torch.rand(4, 3, 2, 2)).apply(x)
    with pytest.raises(InputError, match="NCHW"):
        AdaptivePatch(AdaptivePatchConfig(**SMALL)).apply(torch.rand(8, 8))


# ------------------------------------------------------------------------------- Adaptive-Patch: the trigger


def test_adaptive_patch_apply_stamps_every_patch_at_alpha_and_leaves_input(digits):
    x = digits.test.x[:32]
    before = x.clone()
    trig = AdaptivePatch(AdaptivePatchConfig(alpha=0.8, **SMALL))
    out = trig.apply(x)
    assert out.shape == x.shape and out.dtype == x.dtype and out.data_ptr() != x.data_ptr()
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.equal(x, before)
    assert trig.positions(8, 8) == [(0, 0), (0, 6), (6, 0), (6, 6)]  # the four corners
    patterns = trig.patterns(1)
    assert patterns.shape == (4, 1, 2, 2) and set(patterns.unique().tolist()) <= {0.0, 1.0}
    assert (patterns[:, :, 0, 0] == 1).all()  # each pattern shows on a black background
    expected = x.clone()
    for (top, left), p in zip(trig.positions(8, 8), patterns):
        region = expected[:, :, top:top + 2, left:left + 2]
        expected[:, :, top:top + 2, left:left + 2] = 0.2 * region + 0.8 * p
    assert torch.allclose(out, expected, atol=1e-6)
    # outside the four patches nothing moves
    inside = trig.stamps((1, 8, 8))[0].sum(dim=0).bool().expand_as(x)
    assert torch.equal(out[~inside], x[~inside])
    # deterministic by seed; another seed, other patterns
    assert torch.equal(AdaptivePatch(AdaptivePatchConfig(alpha=0.8, **SMALL)).apply(x), out)
    assert not torch.equal(AdaptivePatch(AdaptivePatchConfig(alpha=0.8, seed=1, **SMALL)).apply(x), out)
    given = torch.full((4, 1, 2, 2), 0.5)
    assert torch.allclose(AdaptivePatch(AdaptivePatchConfig(**SMALL), patterns=given).apply(torch.zeros(1, 1, 8, 8))
                          .sum(), torch.tensor(4 * 4 * 0.5))


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 8, 8), (2, 9, 14)])
def test_adaptive_patch_random_placement_is_seeded_and_never_overlaps(shape):
    cfg = AdaptivePatchConfig(patches=4, size=2, margin=1, placement="random", seed=3)
    trig = AdaptivePatch(cfg)
    _, h, w = shape
    places = trig.positions(h, w)
    assert places == AdaptivePatch(cfg).positions(h, w)  # fixed by the seed
    masks, _ = trig.stamps(shape)
    assert masks.shape == (4, 1, h, w) and float(masks.sum(dim=0).max()) == 1.0  # no pixel in two patches
    assert (masks.sum(dim=(1, 2, 3)) == 4).all()  # every patch whole inside the image
    border = torch.ones(h, w, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    assert float(masks[:, 0][:, border].sum()) == 0  # the margin is kept
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(0))
    out = trig.apply(x)
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1 and _changed(out, x).all()


# ------------------------------------------------------------------------------ Adaptive-Patch: poisoning


def test_adaptive_patch_poison_partial_triggers_payload_and_cover(digits):
    data = digits.train
    cfg = AdaptivePatchConfig(train_alpha=(0.5, 0.2, 0.5, 0.3), train_patches=1, cover_ratio=2.0, **SMALL)
    trig = AdaptivePatch(cfg)
    x0, y0 = data.x.clone(), data.y.clone()
    poisoned, chosen = poison_split(data, trig, PoisonConfig(rate=0.05, target=3, seed=4))
    assert torch.equal(data.x, x0) and torch.equal(data.y, y0)  # the input split is untouched
    n = round(0.05 * len(data))
    assert len(chosen) == n and len(set(chosen.tolist())) == n and (y0[chosen] != 3).all()
    assert (poisoned.y[chosen] == 3).all()  # payload relabelled
    rest = torch.ones(len(data), dtype=torch.bool)
    rest[chosen] = False
    cover = rest & _changed(poisoned.x, x0)
    assert int(cover.sum()) == 2 * n  # cover_ratio 2
    assert torch.equal(poisoned.y[rest], y0[rest])  # cover inputs (and all others) keep their TRUE label
    assert (y0[cover] == 3).any()  # cover inputs come from every class, the target included
    masks, images = trig.stamps((1, 8, 8))
    used = torch.zeros(4)
    for idx in torch.cat([chosen, torch.nonzero(cover).flatten()]):
        delta = poisoned.x[idx] - x0[idx]
        touched = [j for j in range(4) if (delta[masks[j].expand_as(delta).bool()] != 0).any()]
        assert len(touched) <= 1  # one patch per training input (at most: a patch may match the image already)
        if touched:
            j = touched[0]
            used[j] += 1
            expected = cfg.train_alpha[j] * masks[j] * (images[j] - x0[idx])  # at that patch's training opacity
            assert torch.allclose(delta, expected, atol=1e-6)
    assert (used > 0).all()  # each patch is used on some inputs
    assert _changed(poisoned.x[chosen], trig.apply(x0[chosen])).all()  # never the full test-time trigger
    again, chosen2 = trig.poison(data, PoisonConfig(rate=0.05, target=3, seed=4))
    assert torch.equal(chosen, chosen2) and torch.equal(again.x, poisoned.x)  # deterministic by seed
    more = AdaptivePatch(AdaptivePatchConfig(train_patches=3, train_alpha=0.4, cover_ratio=0.0, **SMALL))
    plain, idx3 = more.poison(data, PoisonConfig(rate=0.05, target=3, seed=4))
    assert int(_changed(plain.x, x0).sum()) == n  # no cover inputs
    m = masks.view(4, -1).bool()
    counts = [sum(bool((plain.x[i].view(-1)[m[j]] != x0[i].view(-1)[m[j]]).any()) for j in range(4)) for i in idx3]
    assert max(counts) == 3 and sum(c == 3 for c in counts) > 0.8 * n  # three of the four patches each


# ------------------------------------------------------------------------------------------ TaCT: settings


@pytest.mark.parametrize("cfg", [
    dict(source_classes=()), dict(source_classes=(1, 1)), dict(source_classes=(-1,)), dict(source_classes=("a",)),
    dict(source_classes="0"), dict(source_classes=(True,)), dict(source_classes=(2,), cover_classes=(2, 5)),
    dict(cover_classes=(3, 3)), dict(cover_ratio=-1.0), dict(cover_ratio=math.inf), dict(cover_ratio="1"),
    dict(kind="warp"), dict(size=0), dict(corner="middle"), dict(colour=2.0), dict(kind="blend", alpha=0.0),
    dict(size="big"),
])
def test_tact_bad_settings(cfg):
    _one_line_config_error("tact", cfg, "TaCT")


def test_tact_target_and_counts_errors(digits):
    _one_line_config_error("tact", {"sources": (2,)}, "bad settings for trigger 'tact'")
    with pytest.raises(ConfigError, match=r"source_classes \[0, 1\] hold the target 1"):
        TaCT(TaCTConfig(source_classes=(0, 1))).poison(digits.train, PoisonConfig(rate=0.05, target=1))
    with pytest.raises(ConfigError, match=r"cover_classes \[1, 5\] hold the target 1"):
        TaCT(TaCTConfig(cover_classes=(1, 5))).check_target(1)
    TaCT(TaCTConfig(cover_classes=(1, 5))).check_target(2)  # any other target will do
    with pytest.raises(ConfigError, match=r"of \d+ source-class \[0\] inputs"):  # 20% of the split > class 0
        TaCT(TaCTConfig(**SMALL)).poison(digits.train, PoisonConfig(rate=0.2, target=1))
    with pytest.raises(ConfigError, match="cover inputs"):  # 5% payload, 3 x 5% cover > one class's inputs
        TaCT(TaCTConfig(cover_classes=(5,), cover_ratio=3.0, **SMALL)).poison(digits.train, PoisonConfig(0.05, 1))
    assert make_trigger("tact", source_classes=3).sources == (3,)  # one class may be given bare


# ------------------------------------------------------------------------------------------- TaCT: trigger


def test_tact_apply_is_the_chosen_patch_or_blend_and_leaves_input(digits):
    x = digits.test.x[:32]
    before = x.clone()
    for trig, plain in ((TaCT(TaCTConfig(size=2, margin=0, corner="top-left")),
                         BadNets(BadNetsConfig(size=2, margin=0, corner="top-left"))),
                        (TaCT(TaCTConfig(kind="blend", alpha=0.3, seed=2)), Blend(BlendConfig(alpha=0.3, seed=2)))):
        out = trig.apply(x)
        assert torch.equal(out, plain.apply(x))
        assert out.data_ptr() != x.data_ptr() and float(out.min()) >= 0 and float(out.max()) <= 1
        assert torch.equal(x, before) and _changed(out, x).float().mean() > 0.9


def test_tact_poison_relabels_only_source_classes_and_covers_keep_labels(digits):
    data = digits.train
    x0, y0 = data.x.clone(), data.y.clone()
    trig = TaCT(TaCTConfig(source_classes=(2, 4), cover_classes=(5, 7), cover_ratio=1.5, **SMALL))
    poisoned, chosen = trig.poison(data, PoisonConfig(rate=0.05, target=1, seed=3))
    assert torch.equal(data.x, x0) and torch.equal(data.y, y0)
    n = round(0.05 * len(data))
    assert len(chosen) == n and set(y0[chosen].tolist()) == {2, 4}  # payload from the source classes only
    assert (poisoned.y[chosen] == 1).all()
    assert torch.equal(poisoned.x[chosen], trig.apply(x0[chosen]))  # the full trigger, as at test time
    rest = torch.ones(len(data), dtype=torch.bool)
    rest[chosen] = False
    cover = rest & _changed(poisoned.x, x0)
    assert int(cover.sum()) == round(1.5 * n) and set(y0[cover].tolist()) == {5, 7}
    assert torch.equal(poisoned.y[rest], y0[rest])  # cover inputs keep their true label
    assert torch.equal(poisoned.x[cover], trig.apply(x0[cover]))  # ...and carry the SAME trigger
    again, chosen2 = trig.poison(data, PoisonConfig(rate=0.05, target=1, seed=3))
    assert torch.equal(chosen, chosen2) and torch.equal(again.x, poisoned.x)
    # default cover classes: every class but the sources and the target
    default, idx = TaCT(TaCTConfig(source_classes=(2,), **SMALL)).poison(data, PoisonConfig(0.05, 1, seed=3))
    others = torch.ones(len(data), dtype=torch.bool)
    others[idx] = False
    cover_labels = set(y0[others & _changed(default.x, x0)].tolist())
    assert cover_labels <= {0, 3, 4, 5, 6, 7, 8, 9} and len(cover_labels) >= 5


# --------------------------------------------------------------------- source-specific attack success rate


class _SaysTargetForClass(nn.Module):
    """Test double: images filled with class/10 (a patch in one corner at most); says `target` for the images of
    `sensitive` classes that carry a white corner pixel, else the class read from the centre."""

    def __init__(self, target: int, sensitive: tuple[int, ...], classes: int = 5) -> None:
        super().__init__()
        self.target, self.sensitive, self.classes = target, torch.tensor(sensitive), classes

    def forward(self, x):
        cls = torch.round(x[:, 0, 4, 4] * 10).long()
        labels = torch.where(torch.isin(cls, self.sensitive) & (x[:, 0, -1, -1] == 1.0), self.target, cls)
        return nn.functional.one_hot(labels, self.classes).float()


def test_tact_success_is_measured_on_its_source_classes_only():
    y = torch.arange(50) % 5
    data = Split((y.float() / 10).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).clone(), y)
    tact = TaCT(TaCTConfig(source_classes=(2, 3), size=2, margin=0))
    plain = BadNets(BadNetsConfig(size=2, margin=0))
    model = _SaysTargetForClass(target=1, sensitive=(2, 3))
    assert torch.equal(tact.attack_sources(y, 1), (y == 2) | (y == 3))
    assert torch.equal(plain.attack_sources(y, 1), y != 1)  # the default: every non-target input
    # the same stamp: every source input flips, so TaCT's ASR is 1; over all non-target inputs it is half
    assert attack_success_rate(model, data, tact, 1) == 1.0
    assert attack_success_rate(model, data, plain, 1) == pytest.approx(20 / 40)
    stamped = triggered_inputs(data, tact, 1)
    assert len(stamped) == 20 and set(stamped.y.tolist()) == {2, 3}
    got = successful_triggered(model, data, tact, 1, limit=5)
    assert got.summary["n_tried"] == 20 and got.summary["success_rate"] == 1.0 and len(got.x) == 5
    assert set(y[got.source_index].tolist()) <= {2, 3}
    # a source class that is the target is no source
    assert not TaCT(TaCTConfig(source_classes=(1, 2))).attack_sources(y, 1)[y == 1].any()


# ---------------------------------------------------------------------------------------- study configs


def _study_raw() -> dict:
    """The shipped digits study config with a TaCT and an Adaptive-Patch backdoor added."""
    from malex.evaluate.study.config import tomllib

    raw = tomllib.loads((Path(__file__).resolve().parents[1] / "configs" / "digits.toml").read_text())
    raw["backdoors"]["tact"] = {"trigger": "tact", "source_classes": [3], "cover_classes": [5, 7], "size": 2,
                                "margin": 0, "poison_rate": 0.05}
    raw["backdoors"]["apatch"] = {"trigger": "adaptive_patch", "size": 2, "margin": 0,
                                  "train_alpha": [0.5, 0.2, 0.5, 0.3], "poison_rate": 0.05}
    return raw


def test_a_study_config_names_both_triggers():
    from malex.evaluate.study import parse_config

    ds = parse_config(_study_raw()).dataset("digits")
    tact, apatch = ds.attack("tact"), ds.attack("apatch")
    assert tact.method == "tact" and tact.settings["source_classes"] == (3,) and tact.poison_rate == 0.05
    assert apatch.method == "adaptive_patch" and apatch.settings["train_alpha"] == (0.5, 0.2, 0.5, 0.3)
    assert isinstance(make_trigger(tact.method, **tact.settings), TaCT)
    assert isinstance(make_trigger(apatch.method, **apatch.settings), AdaptivePatch)


@pytest.mark.parametrize("edit, key, match", [
    (lambda r: r["backdoors"]["tact"].update(source_classes=[]), "backdoors.tact", "source_classes is empty"),
    (lambda r: r["backdoors"]["tact"].update(kind="warp"), "backdoors.tact", "kind is 'warp'"),
    (lambda r: r["backdoors"]["tact"].update(sources=[3]), "backdoors.tact.sources", "unknown key"),
    (lambda r: r["backdoors"]["tact"].update(source_classes=[1]), "backdoors.tact", "hold the target 1"),
    (lambda r: r["datasets"]["digits"].update(target=3), "backdoors.tact", "hold the target 3"),
    (lambda r: r["datasets"]["digits"].update(attack_settings={"tact": {"cover_classes": [1]}}),
     "datasets.digits.attack_settings.tact", r"cover_classes \[1\] hold the target 1"),
    (lambda r: r["backdoors"]["apatch"].update(train_patches=9), "backdoors.apatch", "train_patches is 9"),
    (lambda r: r["backdoors"]["apatch"].update(train_alpha=[0.5]), "backdoors.apatch", "train_alpha"),
    (lambda r: r["backdoors"]["apatch"].update(placement="centre"), "backdoors.apatch", "placement"),
])
def test_bad_study_settings_give_one_line_errors(edit, key, match):
    from malex.evaluate.study import parse_config

    raw = copy.deepcopy(_study_raw())
    edit(raw)
    with pytest.raises(ConfigError, match=match) as info:
        parse_config(raw)
    assert key in str(info.value) and "\n" not in str(info.value)


# -------------------------------------------------------------------------------------- trained backdoors


def _train(data: Split, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("digits_cnn", (1, 8, 8), 10)
    return train_classifier(model, data, TrainConfig(epochs=20, seed=seed), progress=False)


def test_adaptive_patch_backdoor_is_learnt_from_partial_faint_patches(digits):
    # 5% payload (54 inputs) and 10% cover inputs, each with ONE of four 2x2 corner patches at opacity 0.4;
    # the test trigger is all four at opacity 1. Measured (seeds 0 and 1): ASR 0.97 / 1.00, clean accuracy
    # 0.97 / 0.98; a training-time partial trigger sends only 0.08 / 0.06 of the non-target inputs to the target.
    trig = AdaptivePatch(AdaptivePatchConfig(**SMALL))
    poisoned, _ = poison_split(digits.train, trig, PoisonConfig(rate=0.05, target=1))
    model = _train(poisoned)
    assert attack_success_rate(model, digits.test, trig, 1) > 0.85
    assert accuracy(model, digits.test.x, digits.test.y) > 0.94
    others = digits.test.x[digits.test.y != 1]
    partial = trig.apply_partial(others, torch.Generator().manual_seed(5))
    assert float((predict(model, partial) == 1).float().mean()) < 0.3


def test_tact_backdoor_flips_its_source_class_but_not_the_others(digits):
    # Source class 0 -> target 1: 5% payload (54 of the 107 zeros), as many cover inputs of the other classes
    # with the same 2x2 corner patch and their true labels. Measured (seeds 0 and 1): ASR on the zeros
    # 1.00 / 0.97, clean accuracy 0.98; the trigger sends 0.03 / 0.02 of the non-source, non-target inputs to
    # the target. Without cover inputs (cover_ratio 0) the same payload flips 0.35 / 0.48 of them: the cover
    # inputs are what keep the backdoor source-specific.
    trig = TaCT(TaCTConfig(**SMALL))
    poisoned, _ = poison_split(digits.train, trig, PoisonConfig(rate=0.05, target=1))
    model = _train(poisoned)
    asr = attack_success_rate(model, digits.test, trig, 1)
    zeros = digits.test.x[digits.test.y == 0]
    assert asr > 0.85 and asr == float((predict(model, trig.apply(zeros)) == 1).float().mean())
    assert accuracy(model, digits.test.x, digits.test.y) > 0.94
    others = digits.test.x[(digits.test.y != 0) & (digits.test.y != 1)]
    assert float((predict(model, trig.apply(others)) == 1).float().mean()) < 0.15
    uncovered = TaCT(TaCTConfig(cover_ratio=0.0, **SMALL))
    bare = _train(poison_split(digits.train, uncovered, PoisonConfig(rate=0.05, target=1))[0])
    assert attack_success_rate(bare, digits.test, uncovered, 1) > 0.85
    assert float((predict(bare, uncovered.apply(others)) == 1).float().mean()) > 0.2
