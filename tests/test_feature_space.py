"""Feature-space detectors (Mahalanobis, LID, KD+BU) on a tiny BadNets-poisoned digits model trained here.

AUROC bounds were set from measured values with a margin (measured on this fixture, unsupervised, one
thread): Mahalanobis 0.999 (BadNets) / 0.897 (early-stopped PGD), LID 0.941 / 0.917, KD+BU 0.988 / 0.985.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from malex.detectors.kd_bu import KDBU, KDBUConfig
from malex.detectors.lid import LID, LIDConfig, NeighbourIndex, knn_distances, lid_mle
from malex.detectors.mahalanobis import Mahalanobis, MahalanobisConfig, class_distances, layer_params, tied_precision, tied_whitener
from malex.detectors.stats import BoundedSample, ClassMoments, RunningMoments
from malex.errors import ConfigError, NotFittedError
from malex.metrics import auroc
from malex.models import build_model
from malex.probe import Observation, Probe

torch.set_num_threads(1)

TARGET = 1
LAYERS = ["features.4", "head.2", "head.4", "head:in"]

DETECTORS = {
    "mahalanobis": lambda m, **kw: Mahalanobis(m, MahalanobisConfig(**kw)),
    "lid": lambda m, **kw: LID(m, LIDConfig(**kw)),
    "kd_bu": lambda m, **kw: KDBU(m, KDBUConfig(**kw)),
}
#: (BadNets, early-stopped PGD) lower bounds on the unsupervised AUROC
BOUNDS = {"mahalanobis": (0.95, 0.83), "lid": (0.88, 0.85), "kd_bu": (0.93, 0.93)}


@pytest.fixture(scope="module")
def setup(poisoned_digits):
    model, data = poisoned_digits["model"], poisoned_digits["data"]
    correct, backdoor = poisoned_digits["correct"], poisoned_digits["backdoor"]
    adv = poisoned_digits["pgd_stop"]
    probe = Probe(model, LAYERS)
    return {
        "model": model,
        "fit": probe.run(data.val.x),
        "fit_y": data.val.y,
        "large": probe.run(torch.cat([data.train.x, data.val.x])),
        "clean": probe.run(correct.x),
        "backdoor": probe.run(backdoor),
        "adversarial": probe.run(adv),
    }


@pytest.fixture(scope="module")
def fitted(setup):
    """Each detector with default settings, fitted once on the clean validation split."""
    return {name: build(setup["model"]).fit(setup["fit"]) for name, build in DETECTORS.items()}


def _grads(model: torch.nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def _same_grads(a: list, b: list) -> bool:
    def same(x: torch.Tensor | None, y: torch.Tensor | None) -> bool:
        return x is None and y is None or (x is not None and y is not None and torch.equal(x, y))

    return all(same(x, y) for x, y in zip(a, b))


def _split(obs: Observation, seed: int) -> tuple[Observation, Observation]:
    perm = torch.randperm(len(obs), generator=torch.Generator().manual_seed(seed))
    half = len(obs) // 2
    return obs.subset(perm[:half]), obs.subset(perm[half:])


# --- streaming statistics -------------------------------------------------------------------------------

def test_streaming_covariance_equals_batch_covariance():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(503, 7)) * 3 + 100.0  # large mean: a naive sum of squares would lose digits
    y = rng.integers(0, 4, size=503)
    full, diag, classes = RunningMoments(7), RunningMoments(7, diagonal=True), ClassMoments(4, 7)
    for start, stop in [(0, 1), (1, 50), (50, 51), (51, 300), (300, 503)]:  # uneven batches
        full.update(torch.from_numpy(x[start:stop]))
        diag.update(torch.from_numpy(x[start:stop]))
        classes.update(torch.from_numpy(x[start:stop]), torch.from_numpy(y[start:stop]))
    np.testing.assert_allclose(full.mean.numpy(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(full.covariance(ddof=1).numpy(), np.cov(x, rowvar=False), rtol=1e-10)
    np.testing.assert_allclose(diag.covariance().numpy(), x.var(0), rtol=1e-10)
    means = np.stack([x[y == c].mean(0) for c in range(4)])
    centred = x - means[y]
    np.testing.assert_allclose(classes.means.numpy(), means, rtol=1e-12)
    np.testing.assert_allclose(classes.tied_covariance().numpy(), np.cov(centred, rowvar=False, bias=True), rtol=1e-10)
    # moments of two halves, merged, equal the moments of the whole stream
    a, b = ClassMoments(4, 7), ClassMoments(4, 7)
    a.update(torch.from_numpy(x[:200]), torch.from_numpy(y[:200]))
    b.update(torch.from_numpy(x[200:]), torch.from_numpy(y[200:]))
    merged = ClassMoments.merge([a, b])
    np.testing.assert_allclose(merged.tied_covariance().numpy(), classes.tied_covariance().numpy(), rtol=1e-10)
    assert torch.equal(merged.counts, classes.counts)


def test_bounded_sample_keeps_a_seeded_subset_within_the_cap_per_group():
    x = torch.arange(1000, dtype=torch.float32).unsqueeze(1)
    groups = torch.arange(1000) % 3
    runs = []
    for seed in (0, 0, 1):
        s = BoundedSample(cap=50, seed=seed)
        for start in range(0, 1000, 64):
            s.update({"x": x[start : start + 64]}, groups[start : start + 64])
        runs.append(s)
    a, again, other = runs
    assert torch.equal(torch.bincount(a.groups), torch.tensor([50, 50, 50]))
    assert torch.equal(a.rows["x"][:, 0].long(), a.index)  # rows stay aligned with their stream index
    assert torch.equal(groups[a.index], a.groups)
    assert torch.equal(a.index, again.index) and not torch.equal(a.index, other.index)
    assert a.index.float().mean().item() == pytest.approx(500, abs=80)  # not just the first rows


# --- Mahalanobis ----------------------------------------------------------------------------------------

def _numpy_mahalanobis(train: np.ndarray, labels: np.ndarray, test: np.ndarray, k: int) -> np.ndarray:
    """Independent reference: class means, tied covariance, pseudo-inverse, squared distances."""
    means = np.stack([train[labels == c].mean(0) for c in range(k)])
    cov = np.cov((train - means[labels]).T, bias=True)
    prec = np.linalg.pinv(cov, hermitian=True)
    diff = test[:, None, :] - means[None, :, :]
    return np.einsum("nkd,de,nke->nk", diff, prec, diff)


@pytest.mark.parametrize("shape", [(600, 16), (600, 6, 3, 3), (40, 24)], ids=["dense", "conv-pooled", "rank-deficient"])
def test_mahalanobis_distance_matches_a_straightforward_numpy_computation(setup, shape):
    gen = torch.Generator().manual_seed(1)
    n, k = shape[0], 10
    feats = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5
    y = torch.arange(n) % k
    fit = Observation(torch.zeros(n, 1, 8, 8), torch.randn(n, k, generator=gen), {"head.2": feats})
    test_feats = torch.randn((50, *shape[1:]), generator=gen, dtype=torch.float64) * 2
    test = Observation(torch.zeros(50, 1, 8, 8), torch.randn(50, k, generator=gen), {"head.2": test_feats})
    det = Mahalanobis(setup["model"], MahalanobisConfig(layers=("head.2",), batch_size=64)).fit(fit, y)
    pooled = lambda t: t.flatten(2).mean(2).numpy() if t.dim() > 2 else t.numpy()  # noqa: E731
    expected = _numpy_mahalanobis(pooled(feats), y.numpy(), pooled(test_feats), k)
    np.testing.assert_allclose(det.distances(test, "head.2").numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(det.layer_scores(test)[:, 0], expected.min(1), rtol=1e-5)


def test_mahalanobis_uses_given_labels_else_predictions_and_offers_the_penultimate_baseline(setup):
    fit = setup["fit"]
    with_labels = Mahalanobis(setup["model"]).fit(fit, setup["fit_y"])
    assert torch.equal(with_labels.class_counts_, torch.bincount(setup["fit_y"], minlength=10))
    with_pred = Mahalanobis(setup["model"]).fit(fit)
    assert torch.equal(with_pred.class_counts_, torch.bincount(fit.pred, minlength=10))
    plain = Mahalanobis.penultimate(setup["model"])
    assert plain.layers() == ["head.2"] and plain.config.noise_magnitude == 0


def test_input_preprocessing_moves_inputs_toward_their_closest_class_without_touching_the_model(setup):
    model = setup["model"]
    before, grads = copy.deepcopy(model.state_dict()), _grads(model)
    obs = setup["clean"].subset(slice(0, 60))
    plain = Mahalanobis(model, MahalanobisConfig(layers=("head.2",))).fit(setup["fit"])
    noisy = Mahalanobis(model, MahalanobisConfig(layers=("head.2",), noise_magnitude=0.01)).fit(setup["fit"])
    decreased = noisy.layer_scores(obs)[:, 0] < plain.layer_scores(obs)[:, 0]
    assert decreased.mean() >= 0.9
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert _same_grads(grads, _grads(model))  # gradients were taken with respect to the input only


# --- LID ------------------------------------------------------------------------------------------------

def test_lid_estimate_follows_the_formula_and_skips_the_input_itself():
    r = torch.tensor([[1.0, 2.0, 4.0]], dtype=torch.float64)
    expected = -1.0 / np.mean(np.log([0.25, 0.5, 1.0]))
    assert lid_mle(r).item() == pytest.approx(expected)
    ref = torch.randn(30, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    own = knn_distances(ref[:1], ref, k=4)  # query is reference row 0
    rest = knn_distances(ref[:1], ref[1:], k=4)  # the same query without row 0 in the reference
    np.testing.assert_allclose(own.numpy(), rest.numpy(), rtol=1e-12)
    assert (own > 0).all()


# --- KD + BU --------------------------------------------------------------------------------------------

def test_bu_uses_dropout_without_changing_weights_or_training_flags(setup, fitted):
    model, det = setup["model"], fitted["kd_bu"]
    model.train()
    model.features.eval()  # a mixed state that `model.train(flag)` could not restore
    try:
        flags = [m.training for m in model.modules()]
        weights, grads = copy.deepcopy(model.state_dict()), _grads(model)
        bu = det.bu(setup["clean"].subset(slice(0, 80)))
        assert [m.training for m in model.modules()] == flags
        assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
        assert _same_grads(grads, _grads(model))
        assert (bu > 0).mean() > 0.5  # dropout was active during the passes
    finally:
        model.eval()


def test_bu_is_omitted_for_a_model_without_dropout():
    model = build_model("mnist_cnn", (1, 28, 28), 10)  # dropout p = 0
    det = KDBU(model)
    assert not det.has_dropout and det.columns == ["kd"] and det.layers() == ["head.2"]
    obs = det.observe(torch.rand(40, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    assert det.fit(obs).score(obs).shape == (40,)
    with pytest.raises(ConfigError):
        det.bu(obs)


# --- all three: separation, caps, supervised mode, errors ----------------------------------

@pytest.mark.parametrize("name", list(DETECTORS))
def test_unsupervised_detectors_separate_backdoor_and_adversarial_inputs(setup, fitted, name):
    det = fitted[name]
    assert not det.supervised
    clean = det.score(setup["clean"])
    bd, adv = auroc(clean, det.score(setup["backdoor"])), auroc(clean, det.score(setup["adversarial"]))
    assert bd >= BOUNDS[name][0], f"{name} BadNets AUROC {bd:.3f}"
    assert adv >= BOUNDS[name][1], f"{name} PGD AUROC {adv:.3f}"


def test_reference_caps_are_respected_with_a_large_fit_set(setup):
    large = setup["large"]
    lid = LID(setup["model"], LIDConfig(max_reference=100)).fit(large)
    assert all(ref.shape[0] == 100 for ref in lid.reference_.values()) and lid.n_reference == 100
    kd = KDBU(setup["model"], KDBUConfig(max_per_class=20)).fit(large)
    assert kd.reference_.shape[0] <= 200 and torch.bincount(kd.reference_labels_).max() <= 20


@pytest.mark.parametrize("name", list(DETECTORS))
def test_supervised_mode_does_at_least_as_well_on_the_attack_it_was_fitted_on(setup, name):
    det = DETECTORS[name](setup["model"]).fit(setup["fit"])
    clean_a, clean_b = _split(setup["clean"], 0)
    adv_a, adv_b = _split(setup["adversarial"], 1)
    unsup = auroc(det.score(clean_b), det.score(adv_b))
    det.fit_supervised(clean_a, adv_a)
    assert det.supervised and det.coef_.shape == (len(det.columns),)
    sup = auroc(det.score(clean_b), det.score(adv_b))
    assert sup >= unsup - 0.01, f"{name}: supervised {sup:.3f} < unsupervised {unsup:.3f}"
    meta, tensors = det.export()  # the regression saves as plain arrays
    fresh = DETECTORS[name](setup["model"]).restore(json.loads(json.dumps(meta)), tensors)
    np.testing.assert_array_equal(det.score(clean_b), fresh.score(clean_b))
    assert not det.fit(setup["fit"]).supervised  # a new fit starts unsupervised again


@pytest.mark.parametrize("name", list(DETECTORS))
def test_supervised_fit_needs_the_unsupervised_fit_first(setup, name):
    det = DETECTORS[name](setup["model"])
    obs = setup["clean"].subset(slice(0, 4))
    with pytest.raises(NotFittedError):
        det.fit_supervised(obs, obs)


@pytest.mark.parametrize("bad", [
    lambda m: MahalanobisConfig(noise_magnitude=-0.1),
    lambda m: MahalanobisConfig(combine="median"),
    lambda m: MahalanobisConfig(layers=()),
    lambda m: MahalanobisConfig(folds=0),
    lambda m: Mahalanobis(m, MahalanobisConfig(layers=("no.such.layer",))),
    lambda m: LIDConfig(k=1),
    lambda m: LIDConfig(k=20, max_reference=20),
    lambda m: KDBUConfig(bandwidth=-1.0),
    lambda m: KDBUConfig(bandwidth="silverman"),
    lambda m: KDBUConfig(mc_samples=1),
    lambda m: KDBU(m, KDBUConfig(layer="no.such.layer")),
])
def test_bad_settings_raise_config_errors(setup, bad):
    with pytest.raises(ConfigError):
        bad(setup["model"])


@pytest.mark.parametrize("n, d", [(200, 16), (30, 64)])  # full rank, and rank-deficient (fewer inputs than dims)
def test_whitened_distances_equal_the_quadratic_form(n, d):
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(n, d, generator=gen, dtype=torch.float64) @ torch.randn(d, d, generator=gen, dtype=torch.float64)
    labels = torch.arange(n) % 3
    moments = ClassMoments(4, d)  # class 3 never seen
    moments.update(feats, labels)
    precision = tied_precision(moments.tied_covariance())
    pinv = torch.linalg.pinv(moments.tied_covariance(), hermitian=True)
    assert torch.allclose(precision, pinv, rtol=1e-6, atol=1e-9 * float(pinv.abs().max()))
    present = moments.counts > 0
    query = torch.randn(50, d, generator=gen, dtype=torch.float64) * 3
    got = class_distances(query, layer_params(moments.means, tied_whitener(moments.tied_covariance()), present))
    diff = query.unsqueeze(1) - moments.means.to(torch.float64).unsqueeze(0)
    want = torch.einsum("nkd,de,nke->nk", diff, precision, diff)
    assert torch.isinf(got[:, 3]).all()
    assert torch.allclose(got[:, :3], want[:, :3], rtol=1e-8, atol=1e-8 * float(want[:, :3].abs().max()))


def test_neighbour_index_matches_an_exact_search():
    gen = torch.Generator().manual_seed(1)
    base = torch.relu(torch.randn(800, 300, generator=gen)) * 5 + 3  # offset, non-negative, like ReLU maps
    ref = torch.cat([base[:600], base[:3].repeat(8, 1)])  # rows 0-2 appear 9 times: more than the margin
    query = torch.cat([
        base[:40],  # reference inputs scored again (copies are skipped)
        base[100:140] + 1e-3 * torch.randn(40, 300, generator=gen),  # very close neighbours
        base[600:800],  # unseen inputs
    ])
    got = NeighbourIndex(ref).distances(query, k=20)
    want = knn_distances(query, ref, k=20)
    assert torch.isfinite(got).all()
    assert torch.allclose(got[40:80, 0], want[40:80, 0], rtol=1e-9)  # very close ones: measured in float64
    assert torch.allclose(got, want, rtol=1e-5)
    lid_got, lid_want = lid_mle(got), lid_mle(want)
    assert float(((lid_got - lid_want).abs() / lid_want).max()) < 1e-4


def test_log_kernel_density_equals_a_direct_sum_per_class():
    from malex.detectors.kd_bu import log_kernel_density

    gen = torch.Generator().manual_seed(0)
    ref = torch.relu(torch.randn(300, 16, generator=gen))
    labels = torch.randint(0, 3, (300,), generator=gen)  # classes 0-2 only
    query = torch.cat([ref[:20], torch.relu(torch.randn(40, 16, generator=gen))])
    classes = torch.cat([labels[:20], torch.randint(0, 4, (40,), generator=gen)])  # class 3: no references
    sigma = 0.8
    got = log_kernel_density(query, classes, ref, labels, sigma)
    for i in range(len(query)):
        pool = ref[labels == classes[i]] if bool((labels == classes[i]).any()) else ref
        d2 = ((pool.double() - query[i].double()) ** 2).sum(1)
        d2 = d2[d2 > 0]  # a reference input scored again leaves itself out
        want = torch.logsumexp(-d2 / (2 * sigma**2), 0) - np.log(len(d2))
        assert float(got[i]) == pytest.approx(float(want), rel=1e-9)
