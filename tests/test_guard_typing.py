"""Learned typing: a guard that types flagged inputs with a logistic regression fitted on examples it makes
itself (PGD it crafts, universal triggers it optimises) types a planted trigger and PGD examples it never saw,
and keeps its typing through save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from malex.errors import ConfigError, ModelFileError
from malex.guard import ADVERSARIAL, BACKDOOR, Guard, GuardConfig
from malex.guard.kind_model import KindModel

#: small stand-in settings, so the test stays short (the defaults attack 300 inputs at 3 budgets)
SMALL = {"n_inputs": 80, "pgd_eps": [0.1, 0.3], "trigger_steps": 30}
#: the share of flagged trigger and PGD inputs the learned typing must call by their kind
TYPING_BOUND = 0.8


@pytest.fixture(scope="module")
def learned(poisoned_digits):
    data = poisoned_digits["data"]
    config = GuardConfig(typing="learned", typing_settings=SMALL, progress=False)
    return Guard(poisoned_digits["model"], config).fit(data.val.x, data.val.y)


def test_learned_typing_types_a_planted_trigger_and_pgd(poisoned_digits, learned):
    assert isinstance(learned.kind_model_, KindModel) and learned.typing_seconds_ > 0
    right = []
    for x, kind in ((poisoned_digits["backdoor"], BACKDOOR), (poisoned_digits["pgd_stop"], ADVERSARIAL)):
        verdict = np.array(learned.screen(x).verdict)
        flagged = verdict[verdict != "benign"]
        assert len(flagged) > 0.5 * len(x)
        right.append(float(np.mean(flagged == kind)))
    assert min(right) > TYPING_BOUND, right


def test_learned_typing_survives_save_and_load(poisoned_digits, learned, tmp_path):
    path = learned.save(tmp_path / "g.safetensors")
    loaded = Guard.load(path, poisoned_digits["model"])
    assert loaded.config.typing == "learned" and loaded.describe()["typing"] == "learned"
    x = torch.cat([poisoned_digits["backdoor"][:40], poisoned_digits["pgd_stop"][:40], poisoned_digits["correct"].x[:40]])
    a, b = learned.screen(x), loaded.screen(x)
    assert a.verdict == b.verdict
    pvalues = a.pvalues
    np.testing.assert_array_equal(learned.kind_model_.backdoor_probability(pvalues),
                                  loaded.kind_model_.backdoor_probability(pvalues))
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
    assert {"typing/mean", "typing/scale", "typing/coef", "typing/intercept"} <= names


def test_a_learned_guard_file_without_its_typing_is_refused(poisoned_digits, learned, tmp_path):
    from malex.guard.io import _digest

    path = learned.save(tmp_path / "g.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys() if not k.startswith("typing/coef")}
    header = json.loads(meta["malex"])
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"malex": meta["malex"],
                                                                    "digest": _digest(header, tensors)})
    with pytest.raises(ModelFileError, match="coef"):
        Guard.load(tmp_path / "bad.safetensors", poisoned_digits["model"])


def test_typing_settings_are_checked():
    with pytest.raises(ConfigError, match="typing"):
        GuardConfig(typing="guess")
    with pytest.raises(ConfigError, match="typing_settings"):
        GuardConfig(typing="learned", typing_settings={"budget": 3})
    with pytest.raises(ConfigError, match="pgd_eps"):
        GuardConfig(typing="learned", typing_settings={"pgd_eps": [2.0]})



def test_fit_typing_on_an_evidence_guard_makes_it_learned_and_saved_as_such(poisoned_digits, learned, tmp_path):
    from malex.guard.io import _digest

    path = learned.save(tmp_path / "g.safetensors")
    with safe_open(str(path), framework="pt") as f:  # the same fitted guard, configured with the evidence rule
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys() if not k.startswith("typing/")}
    header = json.loads(meta["malex"])
    header["config"].update(typing="evidence", typing_settings={"n_inputs": 40, "pgd_eps": [0.3], "trigger_steps": 20})
    save_file(tensors, str(tmp_path / "e.safetensors"), metadata={"malex": json.dumps(header),
                                                                  "digest": _digest(header, tensors)})
    guard = Guard.load(tmp_path / "e.safetensors", poisoned_digits["model"])
    assert guard.config.typing == "evidence" and guard.kind_model_ is None
    guard.fit_typing(poisoned_digits["data"].val.x[:200])
    assert guard.config.typing == "learned" and guard.kind_model_ is not None
    loaded = Guard.load(guard.save(tmp_path / "l.safetensors"), poisoned_digits["model"])
    x = torch.cat([poisoned_digits["backdoor"][:30], poisoned_digits["pgd_stop"][:30]])
    assert loaded.kind_model_ is not None and loaded.screen(x).verdict == guard.screen(x).verdict


def test_a_guard_that_found_no_trigger_types_by_its_no_trigger_setting(poisoned_digits, learned, tmp_path):
    """Saved without a learned model (no universal trigger worked): 'evidence' keeps the evidence rule,
    'adversarial' calls every flagged input adversarial; both load as saved."""
    from malex.guard.io import _digest

    path = learned.save(tmp_path / "g.safetensors")
    x = torch.cat([poisoned_digits["backdoor"][:30], poisoned_digits["pgd_stop"][:30]])
    verdicts = {}
    for rule in ("evidence", "adversarial"):
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("typing/")}
        tensors["typing/evidence_rule"] = torch.ones(1, dtype=torch.float64)
        header = json.loads(meta["malex"])
        header["config"]["typing_settings"] = {**header["config"]["typing_settings"], "no_trigger": rule}
        out = tmp_path / f"{rule}.safetensors"
        save_file(tensors, str(out), metadata={"malex": json.dumps(header), "digest": _digest(header, tensors)})
        guard = Guard.load(out, poisoned_digits["model"])
        assert guard.kind_model_ is None
        verdicts[rule] = np.array(guard.screen(x).verdict)
    flagged = verdicts["evidence"] != "benign"
    assert set(verdicts["adversarial"][flagged]) == {ADVERSARIAL}
    assert BACKDOOR in set(verdicts["evidence"][flagged])  # the evidence rule still calls trigger inputs backdoor


def test_with_trigger_evidence_lets_the_search_decide_only_whether_the_model_is_backdoored(poisoned_digits, learned,
                                                                                            tmp_path):
    """The planted trigger was found, so 'search only' (with_trigger: evidence) types as the evidence rule does."""
    from malex.guard.io import _digest

    assert learned.trigger_found_
    path = learned.save(tmp_path / "g.safetensors")
    x = torch.cat([poisoned_digits["backdoor"][:30], poisoned_digits["pgd_stop"][:30]])
    got = {}
    for name, edit in (("search", {"typing_settings": {**SMALL, "with_trigger": "evidence", "no_trigger": "adversarial"}}),
                       ("evidence", {"typing": "evidence"})):
        with safe_open(str(path), framework="pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        header = json.loads(meta["malex"])
        header["config"].update(edit)
        if name == "evidence":
            tensors = {k: v for k, v in tensors.items() if not k.startswith("typing/")}
        out = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(out), metadata={"malex": json.dumps(header), "digest": _digest(header, tensors)})
        loaded = Guard.load(out, poisoned_digits["model"])
        got[name] = loaded.screen(x).verdict
    assert got["search"] == got["evidence"]
    assert Guard.load(path, poisoned_digits["model"]).trigger_found_
