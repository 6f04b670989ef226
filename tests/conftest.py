"""Shared fixtures. Tests run on one CPU thread so that they stay lean beside other jobs."""

from __future__ import annotations

import os

import pytest
import torch

# One thread for this process and for any child process (the CLI tests start `python -m malex.cli`).
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's bundled digits, split with seed 0 (no download)."""
    from malex.data import load_digits

    return load_digits(0)


@pytest.fixture
def digits_model():
    """An untrained, seeded digits CNN (fast to build; enough for shape and plumbing checks)."""
    from malex.models import build_model

    torch.manual_seed(0)
    return build_model("digits_cnn", (1, 8, 8), 10)


@pytest.fixture(scope="session")
def poisoned_digits(digits):
    """A digits CNN trained once per session with a BadNets 2x2 corner trigger (target 1, 10% poisoned),
    with its correctly classified clean test inputs and its successful trigger inputs. Tests must not
    change the model (detectors and attacks never do; tests check that)."""
    from malex.attacks.backdoor import PoisonConfig, attack_success_rate, make_trigger, poison_split
    from malex.attacks.backdoor import triggered_inputs
    from malex.attacks.adversarial import make_adversarial
    from malex.models import build_model
    from malex.models.inference import predict
    from malex.models.train import TrainConfig, train_classifier

    torch.manual_seed(0)
    target = 1
    trigger = make_trigger("badnets", size=2, margin=0)
    poisoned, _ = poison_split(digits.train, trigger, PoisonConfig(rate=0.1, target=target))
    model = build_model("digits_cnn", digits.image_shape, digits.num_classes)
    train_classifier(model, poisoned, TrainConfig(epochs=25, shift=1), progress=False)
    assert attack_success_rate(model, digits.test, trigger, target) > 0.9
    correct = digits.test.subset(predict(model, digits.test.x) == digits.test.y)
    stamped = triggered_inputs(digits.test, trigger, target).x
    pgd_stop = make_adversarial("pgd", eps=0.2, alpha=0.02, steps=20, early_stop=True).run(
        model, correct.x, correct.y, progress=False).successful()
    return {"model": model, "data": digits, "trigger": trigger, "target": target, "correct": correct,
            "backdoor": stamped[predict(model, stamped) == target], "pgd_stop": pgd_stop}


@pytest.fixture(scope="session")
def detection_sets(poisoned_digits):
    """Inputs for detector tests: clean fit inputs, clean test inputs, trigger inputs, early-stopped PGD."""
    p = poisoned_digits
    return {"model": p["model"], "fit": p["data"].val.x, "clean": p["correct"].x, "backdoor": p["backdoor"],
            "adversarial": p["pgd_stop"]}


@pytest.fixture(scope="session")
def fit_and_score():
    """fit_and_score(detector, sets, kinds): fit on sets["fit"], return {kind: scores} (one probe each)."""
    from malex.probe import Probe

    def run(det, sets, kinds=("clean", "backdoor", "adversarial")):
        probe = Probe(sets["model"], det.layers())
        det.fit(probe.run(sets["fit"]))
        return {k: det.score(probe.run(sets[k])) for k in kinds}

    return run


@pytest.fixture(scope="session")
def ray_local():
    """One Ray instance for the session's Ray tests (2 CPUs, loopback only, no dashboard), shut down at the end;
    the tests that ask for it are skipped when Ray is not installed."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'malex[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", object_store_memory=100 * 2**20,
             log_to_driver=False, logging_level="WARNING")
    yield ray
    ray.shutdown()
