"""The detector contract, checked on every detector of the registry: a new detector is covered the moment it
is registered in `malex.detectors.DETECTORS`.

Each detector is fitted once per module (on the session's BadNets-poisoned digits model, tests/conftest.py)
with its default settings. Method-specific behaviour (does it separate a trigger, does it follow its paper)
lives in the per-method test files.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch
from torch import nn

from malex.detectors import DETECTORS, Detector, detector_config_fields, joint_probe, make_detector
from malex.detectors.base import EVIDENCE_KINDS
from malex.errors import ConfigError, NotFittedError
from malex.probe import Observation

NAMES = list(DETECTORS)
#: settings that keep a slow default quick (the only departures from the defaults in this module)
SETTINGS: dict[str, dict] = {}
#: inputs of each kind (clean, trigger, adversarial) in the scored batch
PER_KIND = 20


def build(name: str, model: nn.Module) -> Detector:
    return make_detector(name, model, **SETTINGS.get(name, {}))


@dataclass
class ModelState:
    """Everything a detector must leave as it found it: parameters and their gradients, buffers, modes."""

    params: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor | None]
    buffers: dict[str, torch.Tensor]
    modes: list[bool]

    @classmethod
    def of(cls, model: nn.Module) -> "ModelState":
        return cls({k: p.detach().clone() for k, p in model.named_parameters()},
                   {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()},
                   {k: b.clone() for k, b in model.named_buffers()},
                   [m.training for m in model.modules()])

    def assert_same(self, other: "ModelState") -> None:
        assert self.params.keys() == other.params.keys() and self.buffers.keys() == other.buffers.keys()
        assert all(torch.equal(v, other.params[k]) for k, v in self.params.items()), "a parameter changed"
        assert all((v is None) == (other.grads[k] is None) and (v is None or torch.equal(v, other.grads[k]))
                   for k, v in self.grads.items()), "a parameter's gradient changed"
        assert all(torch.equal(v, other.buffers[k]) for k, v in self.buffers.items()), "a buffer changed"
        assert self.modes == other.modes, "a module's train/eval mode changed"


@pytest.fixture(scope="module")
def model(poisoned_digits) -> nn.Module:
    """A copy of the session's model in eval mode (a detector that breaks the contract spoils only this)."""
    return copy.deepcopy(poisoned_digits["model"]).eval()


@pytest.fixture(scope="module")
def observed(model, detection_sets) -> dict[str, Observation]:
    """One probe pass per set over the layers of every registered detector: clean fit inputs, a batch mixing
    clean, trigger and adversarial inputs, and other clean inputs to swap in as batch mates."""
    probe = joint_probe(model, {name: build(name, model) for name in NAMES})
    s = detection_sets
    batch = torch.cat([s["clean"][:PER_KIND], s["backdoor"][:PER_KIND], s["adversarial"][:PER_KIND]])
    return {"fit": probe.run(s["fit"]), "batch": probe.run(batch),
            "others": probe.run(s["clean"][PER_KIND : PER_KIND + len(batch)])}


@dataclass
class Fitted:
    detector: Detector
    returned: object
    before: ModelState
    after: ModelState


@pytest.fixture(scope="module")
def fitted(model, observed, poisoned_digits) -> Callable[[str], Fitted]:
    """fitted(name): the registered detector fitted on the clean fit inputs and their labels, once per module,
    with the model's state before and after the fit."""
    cache: dict[str, Fitted] = {}

    def get(name: str) -> Fitted:
        if name not in cache:
            det = build(name, model)
            before = ModelState.of(model)
            returned = det.fit(observed["fit"], poisoned_digits["data"].val.y)
            cache[name] = Fitted(det, returned, before, ModelState.of(model))
        return cache[name]

    return get


# --- 1. fits on clean inputs only and returns itself ------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_fit_takes_clean_inputs_and_optional_labels_only_and_returns_the_detector(name, fitted):
    params = list(inspect.signature(DETECTORS[name].fit).parameters.values())
    assert [p.name for p in params] == ["self", "clean", "y"] and params[2].default is None
    got = fitted(name)
    assert got.returned is got.detector and got.detector.is_fitted


# --- 2. unfitted use raises -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_unfitted_detector_raises_when_scored_or_exported(name, model, observed):
    det = build(name, model)
    assert not det.is_fitted
    with pytest.raises(NotFittedError, match=name):
        det.score(observed["batch"])
    with pytest.raises(NotFittedError, match=name):
        det.export()


# --- 3. one finite float64 score per input ----------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_one_finite_float64_score_per_input(name, fitted, observed):
    det = fitted(name).detector
    scores = det.score(observed["batch"])
    assert isinstance(scores, np.ndarray) and scores.dtype == np.float64
    assert scores.shape == (len(observed["batch"]),) and np.isfinite(scores).all()
    empty = det.score(observed["batch"].subset(slice(0, 0)))
    assert empty.dtype == np.float64 and empty.shape == (0,)
    json.dumps(det.state())  # the report summary is JSON-able


# --- 4. export and restore --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_export_then_restore_on_a_fresh_instance_gives_identical_scores(name, fitted, model, observed):
    det = fitted(name).detector
    meta, tensors = det.export()
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    fresh = build(name, model)
    assert fresh.restore(json.loads(json.dumps(meta)), {k: v.clone() for k, v in tensors.items()}) is fresh
    assert fresh.is_fitted and fresh.layers() == det.layers()
    np.testing.assert_array_equal(fresh.score(observed["batch"]), det.score(observed["batch"]))


# --- 5. the model is never changed ------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_fit_and_score_leave_a_model_in_eval_mode_unchanged(name, fitted, model, observed):
    got = fitted(name)
    got.before.assert_same(got.after)
    got.detector.score(observed["batch"])
    got.before.assert_same(ModelState.of(model))


@pytest.mark.parametrize("name", NAMES)
def test_fit_and_score_leave_a_model_in_train_mode_unchanged(name, model, observed):
    training = copy.deepcopy(model).train()
    before = ModelState.of(training)
    det = build(name, training).fit(observed["fit"])  # without labels, the other way to fit
    det.score(observed["batch"])
    before.assert_same(ModelState.of(training))


# --- 6. an input's score does not depend on its batch mates -----------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_an_inputs_score_does_not_depend_on_its_batch_mates(name, fitted, observed):
    """Reordered, with other mates, or with half of them: the same scores (to 1e-9). Batch sizes stay above
    one: a batch of one input takes other float32 kernels, whose rounding is not a dependence on mates."""
    det, batch = fitted(name).detector, observed["batch"]
    scores = det.score(batch)
    n, half = len(batch), len(batch) // 2
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(det.score(batch.subset(perm)), scores[perm.numpy()], rtol=1e-9, atol=1e-12)
    mates = Observation.concat([batch.subset(slice(0, half)), observed["others"].subset(slice(half, n))])
    np.testing.assert_allclose(det.score(mates)[:half], scores[:half], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(det.score(batch.subset(slice(half, n))), scores[half:], rtol=1e-9, atol=1e-12)


# --- 7. identity, config and the registry -----------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_detector_declares_its_identity_and_rejects_unknown_settings(name, model):
    cls = DETECTORS[name]
    assert cls.name == name and build(name, model).name == name
    assert dataclasses.is_dataclass(cls.config_class) and cls.config_class.__dataclass_params__.frozen
    assert cls.evidence in EVIDENCE_KINDS
    assert detector_config_fields(name) == {f.name for f in dataclasses.fields(cls.config_class)}
    assert cls(model).config == cls(model, None).config == cls(model, cls.config_class()).config
    with pytest.raises(ConfigError, match="bogus"):
        make_detector(name, model, bogus=1)


def test_unknown_detector_names_raise_config_errors(model):
    with pytest.raises(ConfigError, match="expected one of"):
        make_detector("no-such-detector", model)
    with pytest.raises(ConfigError, match="expected one of"):
        detector_config_fields("no-such-detector")


def test_a_detector_class_without_its_identity_is_refused():
    @dataclass(frozen=True)
    class Frozen:
        k: int = 1

    @dataclass
    class Mutable:
        k: int = 1

    def define(**attrs: object) -> type:
        body = {"fit": lambda self, clean, y=None: self, "score": lambda self, obs: np.zeros(len(obs)), **attrs}
        return type("Probing", (Detector,), body)

    define(name="probing", config_class=Frozen, evidence=None)  # complete: accepted
    for attrs, what in (({"config_class": Frozen, "evidence": None}, "name"),
                        ({"name": "probing", "evidence": None}, "config_class"),
                        ({"name": "probing", "config_class": Mutable, "evidence": None}, "frozen"),
                        ({"name": "probing", "config_class": Frozen}, "evidence"),
                        ({"name": "probing", "config_class": Frozen, "evidence": "odd"}, "evidence")):
        with pytest.raises(TypeError, match=what):
            define(**attrs)
