"""Adversarial attacks (FGSM, PGD, CW-L2) against a small digits CNN trained here."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from malex.attacks.adversarial import (
    ADVERSARIAL_ATTACKS,
    CW,
    FGSM,
    PGD,
    AdversarialResult,
    CWConfig,
    FGSMConfig,
    PGDConfig,
    craft_successful,
    make_adversarial,
)
from malex.attacks.adversarial.cw import margin
from malex.data import load_digits
from malex.errors import ConfigError, InputError
from malex.models import build_model

N_ATTACK = 160  # test digits attacked by FGSM/PGD
N_CW = 64  # test digits attacked by CW (slower)
CW_FAST = dict(steps=50, lr=0.1, binary_search_steps=4)  # enough to succeed on 8x8 digits, quick on 2 cores


@pytest.fixture(scope="module")
def trained():
    """A digits_cnn trained for a few epochs; returns (model in eval mode, correctly classified x, y)."""
    data = load_digits(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model("digits_cnn", data.image_shape, data.num_classes)
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(8):
            model.train()
            order = torch.randperm(len(data.train))
            for lo in range(0, len(order), 64):
                idx = order[lo:lo + 64]
                loss = F.cross_entropy(model(data.train.x[idx]), data.train.y[idx])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
    optimiser.zero_grad(set_to_none=True)  # so a test can check that no attack writes .grad
    model.eval()
    with torch.no_grad():
        pred = model(data.test.x).argmax(1)
    accuracy = float((pred == data.test.y).float().mean())
    assert accuracy > 0.9, f"test accuracy {accuracy:.3f}; the attacks below need a working model"
    right = pred == data.test.y
    return model, data.test.x[right], data.test.y[right]


@pytest.fixture(scope="module")
def digits_all():
    """Every test digit, correctly classified or not."""
    return load_digits(0).test


@pytest.fixture(scope="module")
def targets(trained):
    """A fixed random target class different from the true one, for every correctly classified digit."""
    _, _, y = trained
    gen = torch.Generator().manual_seed(1)
    return (y + 1 + torch.randint(0, 9, y.shape, generator=gen)) % 10


@pytest.fixture(scope="module")
def pgd_untargeted(trained):
    model, x, y = trained
    return PGD(PGDConfig(eps=0.2)).run(model, x[:N_ATTACK], y[:N_ATTACK], progress=False)


@pytest.fixture(scope="module")
def cw_untargeted(trained):
    model, x, y = trained
    return CW(CWConfig(**CW_FAST)).run(model, x[:N_CW], y[:N_CW], progress=False)


def _consistent(result: AdversarialResult, model, x: torch.Tensor, expected_success: torch.Tensor) -> None:
    """pred is the model's label on x_adv, success matches it, and x_adv is a valid image batch."""
    assert result.x_adv.shape == x.shape and result.x_adv.dtype == torch.float32
    assert float(result.x_adv.min()) >= 0.0 and float(result.x_adv.max()) <= 1.0
    with torch.no_grad():
        assert torch.equal(result.pred, model(result.x_adv).argmax(1))
    assert torch.equal(result.success, expected_success)
    assert torch.equal(result.x, x)


# --- eps ball, strength ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fgsm", "pgd"])
@pytest.mark.parametrize("eps", [0.05, 0.2])
def test_linf_attacks_stay_in_the_eps_ball_and_the_unit_box(trained, name, eps):
    model, x, y = trained
    x, y = x[:N_ATTACK], y[:N_ATTACK]
    result = make_adversarial(name, eps=eps).run(model, x, y, progress=False)
    _consistent(result, model, x, result.pred != y)
    assert float((result.x_adv - x).abs().max()) <= eps + 1e-6
    assert float((result.x_adv - x).abs().max()) > eps / 2  # it did move


def test_fgsm_with_zero_eps_returns_the_inputs(trained):
    model, x, y = trained
    result = FGSM(FGSMConfig(eps=0.0)).run(model, x[:32], y[:32], progress=False)
    assert torch.equal(result.x_adv, x[:32])
    assert not bool(result.success.any())  # all were correctly classified
    assert math.isnan(result.mean_l2) and math.isnan(result.mean_linf)


def test_pgd_is_strong_and_stronger_than_fgsm(trained, pgd_untargeted):
    model, x, y = trained
    fgsm = FGSM(FGSMConfig(eps=0.2)).run(model, x[:N_ATTACK], y[:N_ATTACK], progress=False)
    assert pgd_untargeted.success_rate >= 0.9
    assert pgd_untargeted.success_rate > fgsm.success_rate
    # weaker budget: the gap is wide when FGSM's single step is far from enough
    fgsm_small = FGSM(FGSMConfig(eps=0.1)).run(model, x[:N_ATTACK], y[:N_ATTACK], progress=False)
    pgd_small = PGD(PGDConfig(eps=0.1, steps=20)).run(model, x[:N_ATTACK], y[:N_ATTACK], progress=False)
    assert pgd_small.success_rate > fgsm_small.success_rate


def test_pgd_is_reproducible_for_a_seed_and_varies_with_it(trained):
    model, x, y = trained
    x, y = x[:48], y[:48]
    a = PGD(PGDConfig(eps=0.1, steps=5, seed=3)).run(model, x, y, progress=False)
    b = PGD(PGDConfig(eps=0.1, steps=5, seed=3)).run(model, x, y, progress=False)
    c = PGD(PGDConfig(eps=0.1, steps=5, seed=4)).run(model, x, y, progress=False)
    assert torch.equal(a.x_adv, b.x_adv)
    assert not torch.equal(a.x_adv, c.x_adv)


def test_results_do_not_depend_on_the_batch_size(trained):
    model, x, y = trained
    x, y = x[:50], y[:50]
    whole = FGSM(FGSMConfig(eps=0.1)).run(model, x, y, batch_size=256, progress=False)
    pieces = FGSM(FGSMConfig(eps=0.1)).run(model, x, y, batch_size=7, progress=True)
    assert torch.allclose(whole.x_adv, pieces.x_adv, atol=1e-6)
    assert torch.equal(whole.success, pieces.success)


# --- targeted attacks ---------------------------------------------------------------------------------


def test_targeted_pgd_hits_the_target(trained, targets):
    model, x, y = trained
    x, y, t = x[:N_ATTACK], y[:N_ATTACK], targets[:N_ATTACK]
    result = PGD(PGDConfig(eps=0.3)).run(model, x, y, target=t, progress=False)
    _consistent(result, model, x, result.pred == t)
    assert result.success_rate >= 0.9
    assert float((result.x_adv - x).abs().max()) <= 0.3 + 1e-6


def test_targeted_cw_hits_the_target(trained, targets):
    model, x, y = trained
    x, y, t = x[:N_CW], y[:N_CW], targets[:N_CW]
    result = CW(CWConfig(**CW_FAST)).run(model, x, y, target=t, progress=False)
    _consistent(result, model, x, result.pred == t)
    assert result.success_rate >= 0.8
    failed = ~result.success
    assert torch.equal(result.x_adv[failed], x[failed])  # no success: the input comes back unchanged


# --- CW ------------------------------------------------------------------------------------------------


def test_cw_succeeds_with_smaller_l2_than_pgd(trained, pgd_untargeted, cw_untargeted):
    model, x, y = trained
    _consistent(cw_untargeted, model, x[:N_CW], cw_untargeted.pred != y[:N_CW])
    assert cw_untargeted.success_rate >= 0.95
    pgd_l2 = pgd_untargeted.l2[:N_CW][pgd_untargeted.success[:N_CW]].mean()
    assert cw_untargeted.mean_l2 < 0.8 * float(pgd_l2)
    assert cw_untargeted.mean_l2 > 0.0


def test_cw_binary_search_shrinks_the_perturbation(trained, cw_untargeted):
    """With one binary-search step c stays at its (large) start value; more steps find closer examples."""
    model, x, y = trained
    one = CW(CWConfig(**{**CW_FAST, "binary_search_steps": 1, "c": 10.0})).run(model, x[:N_CW], y[:N_CW],
                                                                               progress=False)
    both = one.success & cw_untargeted.success
    assert int(both.sum()) >= N_CW // 2
    assert float(cw_untargeted.l2[both].mean()) < float(one.l2[both].mean())


def test_cw_confidence_is_honoured(trained):
    model, x, y = trained
    kappa = 3.0
    result = CW(CWConfig(confidence=kappa, **CW_FAST)).run(model, x[:32], y[:32], progress=False)
    assert result.success_rate >= 0.8
    with torch.no_grad():
        m = margin(model(result.successful()), y[:32][result.success], targeted=False)
    assert float(m.max()) < -kappa + 1e-3


# --- the model is left alone ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, settings", [("fgsm", {}), ("pgd", {"steps": 3}), ("cw", {"steps": 5, "binary_search_steps": 2})])
def test_attacks_leave_model_and_inputs_untouched(trained, name, settings):
    model, x, y = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad for p in model.parameters()]
    flags = [p.requires_grad for p in model.parameters()]
    x_in = x[:20].clone()
    model.train()  # the attack must switch to eval for the run and restore this afterwards
    try:
        result = make_adversarial(name, **settings).run(model, x_in, y[:20], progress=False)
        assert model.training
    finally:
        model.eval()
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    assert [p.grad for p in model.parameters()] == grads == [None] * len(grads)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert torch.equal(x_in, x[:20])
    with torch.no_grad():  # the prediction was made in eval mode (dropout off)
        assert torch.equal(result.pred, model(result.x_adv).argmax(1))


# --- result -------------------------------------------------------------------------------------------------


def test_result_norms_and_summary():
    x = torch.zeros(3, 1, 2, 2)
    x_adv = x.clone()
    x_adv[0, 0, 0, 0] = 0.3  # L2 0.3, Linf 0.3
    x_adv[1] = 0.5  # L2 1.0, Linf 0.5
    x_adv[2, 0, 1, 1] = 0.9  # not successful: excluded from the means
    result = AdversarialResult(
        x_adv=x_adv, success=torch.tensor([True, True, False]), pred=torch.tensor([1, 2, 0]), seconds=0.5, x=x
    )
    assert result.success_rate == pytest.approx(2 / 3)
    assert result.mean_l2 == pytest.approx(0.65)
    assert result.mean_linf == pytest.approx(0.4)
    assert result.successful().shape == (2, 1, 2, 2)
    summary = json.loads(json.dumps(result.summary()))
    assert summary == pytest.approx({"success_rate": 2 / 3, "mean_l2": 0.65, "mean_linf": 0.4, "n": 3, "seconds": 0.5})
    with pytest.raises(InputError):
        AdversarialResult(x_adv=x_adv, success=torch.tensor([True]), pred=torch.tensor([1]), seconds=0.0, x=x)


# --- successful inputs only -----------------------------------------------------------------------------


class _RecordingFGSM(FGSM):
    """FGSM that records the (true label, target) pairs and the batch sizes it was asked to attack."""

    def __init__(self, config: FGSMConfig | None = None) -> None:
        super().__init__(config)
        self.asked: list[tuple[int, int]] = []
        self.runs: list[int] = []

    def run(self, model, x, y, target=None, batch_size=256, progress=True):
        self.runs.append(len(x))
        return super().run(model, x, y, target=target, batch_size=batch_size, progress=progress)

    def _perturb(self, model, x, y, target, generator):
        self.asked += list(zip(y.tolist(), target.tolist())) if target is not None else []
        return super()._perturb(model, x, y, target, generator)


def test_craft_successful_keeps_only_successes_from_correct_sources(trained, digits_all):
    model, _, _ = trained
    x, y = digits_all.x[:120], digits_all.y[:120]
    crafted = craft_successful(FGSM(FGSMConfig(eps=0.15)), model, x, y, batch_size=32)
    correct = torch.nonzero(model(x).argmax(1) == y).flatten()
    assert 0 < len(crafted) < len(correct) < len(x)  # some sources are wrong already, some resist the attack
    assert set(crafted.source_index.tolist()) <= set(correct.tolist())
    with torch.no_grad():
        pred = model(crafted.x).argmax(1)
    assert torch.equal(pred, crafted.label)  # untargeted: the label is the model's
    assert (pred != y[crafted.source_index]).all()
    assert float((crafted.x - x[crafted.source_index]).abs().max()) <= 0.15 + 1e-6
    s = crafted.summary
    assert s["n"] == len(crafted) and s["n_tried"] == len(correct)
    assert s["success_rate"] == pytest.approx(s["n"] / s["n_tried"])
    l2 = (crafted.x - x[crafted.source_index]).flatten(1).norm(dim=1)
    assert s["mean_l2"] == pytest.approx(float(l2.mean()), rel=1e-5)


def test_craft_successful_targeted_asks_every_other_class_for_each_source(trained):
    model, x, y = trained
    attack = _RecordingFGSM(FGSMConfig(eps=0.3))
    crafted = craft_successful(attack, model, x[:4], y[:4], targeted=True, batch_size=16)
    expected = [(c, (c + k) % 10) for c in y[:4].tolist() for k in range(1, 10)]
    assert attack.asked == expected and attack.runs == [16, 16, 4]
    assert crafted.summary["n_tried"] == 36
    with torch.no_grad():
        assert torch.equal(model(crafted.x).argmax(1), crafted.label)
    assert (crafted.label != y[:4][crafted.source_index]).all()
    asked = [(i, (c + k) % 10) for i, c in enumerate(y[:4].tolist()) for k in range(1, 10)]
    kept = list(zip(crafted.source_index.tolist(), crafted.label.tolist()))
    assert kept == [p for p in asked if p in kept] and len(set(kept)) == len(kept)  # in the order asked, once each


def test_craft_successful_limit_stops_after_the_chunk_that_reaches_it(trained):
    model, x, y = trained
    everything = craft_successful(FGSM(FGSMConfig(eps=0.3)), model, x[:64], y[:64], batch_size=8)
    assert len(everything) > 5
    attack = _RecordingFGSM(FGSMConfig(eps=0.3))
    limited = craft_successful(attack, model, x[:64], y[:64], limit=5, batch_size=8)
    assert len(limited) == 5 and limited.summary["n"] == 5
    assert len(attack.runs) < 8 and limited.summary["n_tried"] == 8 * len(attack.runs)
    assert torch.equal(limited.x, everything.x[:5])
    assert torch.equal(limited.source_index, everything.source_index[:5])


def test_craft_successful_with_no_success_and_bad_settings(trained):
    model, x, y = trained
    crafted = craft_successful(FGSM(FGSMConfig(eps=0.0)), model, x[:10], y[:10])
    assert len(crafted) == 0 and crafted.x.shape == (0, 1, 8, 8) and crafted.summary["n_tried"] == 10
    assert crafted.summary["success_rate"] == 0.0 and math.isnan(crafted.summary["mean_l2"])
    with pytest.raises(ConfigError, match="limit"):
        craft_successful(FGSM(), model, x[:4], y[:4], limit=0)
    with pytest.raises(ConfigError, match="batch_size"):
        craft_successful(FGSM(), model, x[:4], y[:4], batch_size=0)
    with pytest.raises(InputError, match="expected"):
        craft_successful(FGSM(), model, x[:4], y[:3])


# --- registry and errors ------------------------------------------------------------------------------------


def test_registry_builds_configured_attacks():
    assert set(ADVERSARIAL_ATTACKS) == {"fgsm", "pgd", "cw", "adaptive_pgd", "orthogonal_pgd", "adaptive_cw",
                                       "feature_matching"}
    pgd = make_adversarial("pgd", eps=0.05, steps=7)
    assert isinstance(pgd, PGD) and pgd.config == PGDConfig(eps=0.05, steps=7)
    assert pgd.config.step_size == pytest.approx(0.0125)
    assert isinstance(make_adversarial("cw", c=2.0), CW)
    assert isinstance(make_adversarial("fgsm"), FGSM)


def test_unknown_attack_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match="fgsm, pgd, cw"):
        make_adversarial("deepfool")


@pytest.mark.parametrize(
    "build",
    [
        lambda: FGSMConfig(eps=-0.1),
        lambda: FGSMConfig(eps=float("nan")),
        lambda: PGDConfig(eps=-1.0),
        lambda: PGDConfig(steps=0),
        lambda: PGDConfig(alpha=0.0),
        lambda: PGDConfig(steps=2.5),
        lambda: CWConfig(c=0.0),
        lambda: CWConfig(confidence=-1.0),
        lambda: CWConfig(steps=0),
        lambda: CWConfig(lr=-0.01),
        lambda: CWConfig(binary_search_steps=0),
        lambda: make_adversarial("pgd", epsilon=0.1),
        lambda: FGSM(PGDConfig()),
    ],
)
def test_bad_settings_raise_config_error(build):
    with pytest.raises(ConfigError):
        build()


def test_bad_batch_size_raises_config_error(trained):
    model, x, y = trained
    with pytest.raises(ConfigError):
        FGSM().run(model, x[:4], y[:4], batch_size=0, progress=False)


def test_bad_inputs_raise_input_error(trained):
    model, x, y = trained
    bad = x[:4].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError):
        PGD().run(model, bad, y[:4], progress=False)
    with pytest.raises(InputError):
        FGSM().run(model, x[:4] * 2.0 + 0.5, y[:4], progress=False)  # outside [0, 1]
    with pytest.raises(InputError):
        CW().run(model, x[:4], y[:3], progress=False)
    with pytest.raises(InputError):
        FGSM().run(model, x[:4], y[:4], target=torch.tensor([1, 2]), progress=False)
    with pytest.raises(InputError):
        FGSM().run(model, x[:4], torch.tensor([0, 1, 2, 10]), progress=False)  # class 10 of 10
