"""WaNet and Adaptive-Blend: the test-time triggers, their training-time poisoning, and trained backdoors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from malex.attacks.backdoor import (
    TRIGGERS, AdaptiveBlend, AdaptiveBlendConfig, BadNets, BadNetsConfig, PoisonConfig, WaNet, WaNetConfig,
    attack_success_rate, make_trigger, poison_split,
)
from malex.data.dataset import Split
from malex.errors import ConfigError, InputError
from malex.models import build_model
from malex.models.inference import accuracy, predict
from malex.models.train import TrainConfig, train_classifier

NEW = [("wanet", {}), ("adaptive_blend", {})]


def _changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per input: whether any pixel differs."""
    return (a != b).flatten(1).any(dim=1)


# ------------------------------------------------------------------------------------------ the test trigger


@pytest.mark.parametrize("name, cfg", NEW)
def test_apply_is_deterministic_new_in_unit_range_and_leaves_input(digits, name, cfg):
    x = digits.test.x[:64]
    before = x.clone()
    out = make_trigger(name, **cfg).apply(x)
    again = make_trigger(name, **cfg).apply(x)  # a fresh instance: the pattern comes from the seed alone
    assert torch.equal(out, again)
    assert out.shape == x.shape and out.dtype == x.dtype and out.data_ptr() != x.data_ptr()
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.equal(x, before)
    assert _changed(out, x).float().mean() > 0.9  # the trigger does change (almost) every input
    other = make_trigger(name, **{**cfg, "seed": 1}).apply(x)
    assert not torch.allclose(out, other)  # the seed fixes the trigger


@pytest.mark.parametrize("name", ["wanet", "adaptive_blend"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 8, 8), (2, 6, 10)])
def test_apply_works_for_every_image_shape(name, shape):
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(0))
    out = make_trigger(name).apply(x)
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1 and not torch.equal(out, x)


def test_wanet_weak_warp_is_identity_and_keeps_orientation():
    # a vanishing warp must give the image back: checks the identity grid's axes (x = width, y = height)
    x = torch.rand(2, 3, 6, 10, generator=torch.Generator().manual_seed(1))
    out = WaNet(WaNetConfig(s=1e-6)).apply(x)
    assert torch.allclose(out, x, atol=1e-4)
    grid = WaNet().grid(6, 10)
    assert grid.shape == (1, 6, 10, 2) and float(grid.abs().max()) <= 1.0


def test_wanet_warp_is_small_and_less_visible_than_badnets(digits):
    x = F.interpolate(digits.test.x, size=(28, 28), mode="bilinear", align_corners=False)  # MNIST-sized digits
    warped = WaNet().apply(x)
    stamped = BadNets(BadNetsConfig(size=4)).apply(x)
    warp_change, patch_change = (warped - x).abs(), (stamped - x).abs()
    assert float(warp_change.mean()) < 0.03  # measured 0.014 (BadNets: 0.019, all in one corner)
    # no pixel jumps far (pixels move by 0.17 px on average, 0.49 px at most): the largest change per image is
    # measured 0.10 for the warp and 0.99 for the BadNets square
    assert float(warp_change.amax(dim=(1, 2, 3)).mean()) < 0.25
    assert float(patch_change.amax(dim=(1, 2, 3)).mean()) > 0.9
    # the displacement field is smooth and fixed; a stronger warp changes the image more
    assert float((WaNet(WaNetConfig(s=1.0)).apply(x) - x).abs().mean()) > 1.5 * float(warp_change.mean())


def test_adaptive_blend_test_trigger_is_full_pattern_at_alpha():
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    trig = AdaptiveBlend(AdaptiveBlendConfig(alpha=0.2, seed=3))
    pattern = trig.pattern((3, 8, 8))
    assert float(pattern.min()) >= 0 and float(pattern.max()) <= 1
    assert torch.allclose(trig.apply(x), 0.8 * x + 0.2 * pattern, atol=1e-6)
    custom = torch.full((3, 8, 8), 0.5)
    assert torch.allclose(AdaptiveBlend(pattern=custom).apply(x), 0.8 * x + 0.1, atol=1e-6)


@pytest.mark.parametrize("h, w, pieces", [(8, 8, 16), (28, 28, 16), (32, 32, 16), (7, 10, 9)])
def test_adaptive_blend_pieces_tile_the_image(h, w, pieces):
    trig = AdaptiveBlend(AdaptiveBlendConfig(pieces=pieces))
    masks = trig.piece_masks(h, w)
    assert masks.shape == (pieces, h, w)
    assert torch.equal(masks.sum(dim=0), torch.ones(h, w))  # every pixel in exactly one piece
    areas = masks.sum(dim=(1, 2))
    assert float(areas.min()) >= 1 and float(areas.max() - areas.min()) <= max(h, w)  # near-equal pieces
    chosen = trig.random_masks(50, h, w, torch.Generator().manual_seed(0))
    kept = pieces - round(0.5 * pieces)
    per_input = torch.einsum("nhw,phw->np", chosen[:, 0], masks) / areas  # share of each piece covered
    assert torch.all((per_input == 0) | (per_input == 1))  # whole pieces only
    assert torch.all(per_input.sum(dim=1) == kept)
    assert len({tuple(r.tolist()) for r in per_input}) > 10  # the subsets vary between inputs


# ---------------------------------------------------------------------------------------------- poisoning


def test_wanet_poison_relabels_payload_and_keeps_noise_inputs_labels(digits):
    data = digits.train
    trig = WaNet(WaNetConfig(cross_ratio=2.0))
    x0, y0 = data.x.clone(), data.y.clone()
    poisoned, chosen = poison_split(data, trig, PoisonConfig(rate=0.1, target=1, seed=0))
    assert torch.equal(data.x, x0) and torch.equal(data.y, y0)  # the input split is untouched
    n = round(0.1 * len(data))
    assert len(chosen) == n and len(set(chosen.tolist())) == n and (y0[chosen] != 1).all()
    assert (poisoned.y[chosen] == 1).all()
    assert torch.equal(poisoned.x[chosen], trig.apply(x0[chosen]))
    rest = torch.ones(len(data), dtype=torch.bool)
    rest[chosen] = False
    noisy = rest & _changed(poisoned.x, x0)
    assert int(noisy.sum()) == round(2.0 * n)  # the cross (noise-mode) inputs
    assert torch.equal(poisoned.y[rest], y0[rest])  # ...keep their true label, as does everything else
    assert (y0[noisy] == 1).any()  # cross inputs come from every class, the target included
    # a noisy warp is the trigger warp plus noise: close to the trigger, never equal to it
    exact = trig.apply(x0[noisy])
    assert not torch.equal(poisoned.x[noisy], exact)
    assert float((poisoned.x[noisy] - x0[noisy]).abs().mean()) < 3 * float((exact - x0[noisy]).abs().mean())
    again, chosen2 = trig.poison(data, PoisonConfig(rate=0.1, target=1, seed=0))
    assert torch.equal(chosen, chosen2) and torch.equal(again.x, poisoned.x)  # deterministic by seed
    plain, _ = WaNet(WaNetConfig(cross_ratio=0.0)).poison(data, PoisonConfig(rate=0.1, target=1))
    assert int(_changed(plain.x, x0).sum()) == n  # no noise mode: only the payload changes


def test_adaptive_blend_poison_partial_triggers_and_regularization_labels(digits):
    data = digits.train
    cfg = AdaptiveBlendConfig(train_alpha=0.15, cover_ratio=1.0, pieces=16, mask_rate=0.5)
    trig = AdaptiveBlend(cfg)
    x0, y0 = data.x.clone(), data.y.clone()
    poisoned, chosen = trig.poison(data, PoisonConfig(rate=0.05, target=3, seed=4))
    n = round(0.05 * len(data))
    assert len(chosen) == n and (y0[chosen] != 3).all() and (poisoned.y[chosen] == 3).all()
    rest = torch.ones(len(data), dtype=torch.bool)
    rest[chosen] = False
    cover = rest & _changed(poisoned.x, x0)
    assert int(cover.sum()) == n  # cover_ratio 1: as many regularization inputs as payload inputs
    assert torch.equal(poisoned.y[rest], y0[rest])  # regularization inputs keep their TRUE label
    pattern = trig.pattern(data.x.shape[1:])
    pieces = trig.piece_masks(8, 8)
    for idx in torch.cat([chosen, torch.nonzero(cover).flatten()]):
        delta = poisoned.x[idx] - x0[idx]
        expected = 0.15 * (pattern - x0[idx])
        touched = ((delta != 0).any(dim=0)).float()
        covered = torch.einsum("hw,phw->p", touched, pieces) / pieces.sum(dim=(1, 2))
        kept = covered > 0
        assert int(kept.sum()) == 8  # half of the 16 pieces
        inside = (pieces[kept].sum(dim=0) > 0).expand_as(delta)
        assert torch.allclose(delta[inside], expected[inside], atol=1e-6)  # blended at train_alpha...
        assert torch.all(delta[~inside] == 0)  # ...and nothing outside the chosen pieces
    full_share = _changed(poisoned.x[chosen], trig.apply(x0[chosen]))
    assert full_share.all()  # training inputs never carry the full test-time trigger


def test_default_poison_is_stamp_and_relabel(digits):
    trig = BadNets(BadNetsConfig(size=2, margin=0))
    a, ia = trig.poison(digits.train, PoisonConfig(rate=0.1, target=1))
    b, ib = poison_split(digits.train, trig, PoisonConfig(rate=0.1, target=1))
    assert torch.equal(ia, ib) and torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert torch.equal(a.x[ia], trig.apply(digits.train.x[ia])) and int(_changed(a.x, digits.train.x).sum()) == len(ia)


# ----------------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize("cfg", [
    dict(k=1), dict(s=0.0), dict(s=-1.0), dict(s=math.nan), dict(grid_rescale=0.0), dict(cross_ratio=-1.0),
    dict(cross_ratio=math.inf),
])
def test_wanet_bad_settings(cfg):
    with pytest.raises(ConfigError, match="WaNet"):
        make_trigger("wanet", **cfg)


@pytest.mark.parametrize("cfg", [
    dict(alpha=0.0), dict(train_alpha=1.5), dict(pieces=15), dict(pieces=0), dict(mask_rate=1.0),
    dict(mask_rate=0.99), dict(mask_rate=-0.1), dict(cover_ratio=-1.0), dict(cover_ratio=math.nan),
])
def test_adaptive_blend_bad_settings(cfg):
    with pytest.raises(ConfigError, match="adaptive blend"):
        make_trigger("adaptive_blend", **cfg)


def test_bad_use_raises_typed_errors(digits):
    assert {"wanet", "adaptive_blend"} <= set(TRIGGERS)
    with pytest.raises(ConfigError, match="bad settings for trigger 'wanet'"):
        make_trigger("wanet", strength=2)
    with pytest.raises(ConfigError, match="finer than the 4x4 image"):
        WaNet(WaNetConfig(k=5)).apply(torch.rand(1, 1, 4, 4))
    with pytest.raises(InputError, match="NCHW"):
        WaNet().apply(torch.rand(8, 8))
    with pytest.raises(ConfigError, match="do not fit a 8x8 image"):
        AdaptiveBlend(AdaptiveBlendConfig(pieces=81)).poison(digits.train, PoisonConfig(rate=0.1))
    with pytest.raises(ConfigError, match="pattern is"):
        AdaptiveBlend(pattern=torch.rand(3, 8, 8)).apply(torch.rand(1, 1, 8, 8))
    with pytest.raises(ConfigError, match="cover inputs"):  # 40% payload + 2 x 40% noise inputs > 100%
        WaNet().poison(digits.train, PoisonConfig(rate=0.4))
    empty = WaNet().apply(torch.rand(0, 1, 8, 8))
    assert empty.shape == (0, 1, 8, 8)


# -------------------------------------------------------------------------------------- trained backdoors


def _train(data: Split, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("digits_cnn", (1, 8, 8), 10)
    return train_classifier(model, data, TrainConfig(epochs=20, seed=seed), progress=False)


def test_wanet_backdoor_is_learnt_on_digits(digits):
    # On 8x8 images the paper's s = 0.5 moves pixels by a tenth of a pixel; s = 1 without noise mode is
    # learnt reliably here (measured: ASR 0.97-0.98, clean accuracy 0.98 over two seeds).
    trig = WaNet(WaNetConfig(s=1.0, cross_ratio=0.0))
    poisoned, _ = poison_split(digits.train, trig, PoisonConfig(rate=0.1, target=1))
    model = _train(poisoned)
    assert attack_success_rate(model, digits.test, trig, 1) > 0.9
    assert accuracy(model, digits.test.x, digits.test.y) > 0.94


def test_adaptive_blend_backdoor_needs_the_full_trigger(digits):
    # Stronger blends than the paper's 0.15 / 0.2, which a 20-epoch digits CNN does not pick up; measured:
    # ASR 1.0 with the full trigger, 0.32-0.34 with a training-time partial trigger (regularization inputs
    # teach the model that half the pattern means nothing), clean accuracy 0.97.
    trig = AdaptiveBlend(AdaptiveBlendConfig(alpha=0.4, train_alpha=0.3))
    poisoned, _ = poison_split(digits.train, trig, PoisonConfig(rate=0.1, target=1))
    model = _train(poisoned)
    assert attack_success_rate(model, digits.test, trig, 1) > 0.9
    assert accuracy(model, digits.test.x, digits.test.y) > 0.94
    others = digits.test.x[digits.test.y != 1]
    partial = trig.apply_partial(others, torch.Generator().manual_seed(5))
    assert float((predict(model, partial) == 1).float().mean()) < 0.7
