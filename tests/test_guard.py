"""The Guard: calibrated FPR, verdict types, persistence, refusal of tampered files and other models."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from malex.attacks.adversarial import make_adversarial
from malex.errors import ConfigError, InputError, ModelFileError, NotFittedError
from malex.guard import ADVERSARIAL, BACKDOOR, BENIGN, Guard, GuardConfig
from malex.guard.guard import calibrate_guard, combine_pvalues, in_sample_guard_scores
from malex.guard.pvalues import conformal_pvalues, in_sample_pvalues, in_sample_tail_pvalues, tail_pvalues
from malex.models import build_model
from malex.models.inference import predict

TARGET = 1


@pytest.fixture(scope="module")
def setup(poisoned_digits):
    model, data = poisoned_digits["model"], poisoned_digits["data"]
    correct = poisoned_digits["correct"]
    cw = make_adversarial("cw", steps=60).run(model, correct.x, correct.y, progress=False).successful()
    guard = Guard(model, GuardConfig(progress=False)).fit(data.val.x, data.val.y)
    return {"model": model, "data": data, "guard": guard, "clean": correct.x,
            "backdoor": poisoned_digits["backdoor"], "cw": cw}


def test_conformal_pvalues_rank_scores_among_clean_ones():
    cal = np.array([0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(conformal_pvalues(cal, np.array([0.0, 0.35, 0.4, 9.0])), [1.0, 0.4, 0.4, 0.2])
    np.testing.assert_allclose(in_sample_pvalues(cal), [1.0, 0.75, 0.5, 0.25])


def test_tail_pvalues_keep_falling_beyond_the_clean_scores():
    cal = np.random.default_rng(0).normal(size=200)
    s = np.array([-3.0, 0.0, cal.max() + 0.5, cal.max() + 2.0, cal.max() + 5.0])
    p, plain = tail_pvalues(cal, s), conformal_pvalues(cal, s)
    np.testing.assert_allclose(p[:2], plain[:2])  # below the tail: the conformal p-value
    assert p[2] <= plain[2] and p[2] > p[3] > p[4] > 0  # beyond every clean score: still ordered
    assert p[4] < 1e-3 < 1 / 201  # far beyond: smaller than any conformal p-value can be


def test_in_sample_tail_pvalues_leave_each_score_out():
    cal = np.random.default_rng(1).exponential(size=60)
    loo = [tail_pvalues(np.delete(cal, i), cal[i : i + 1])[0] for i in range(cal.size)]
    np.testing.assert_allclose(in_sample_tail_pvalues(cal), loo)


def test_a_score_far_beyond_tied_clean_scores_gives_a_finite_guard_score():
    """A discrete detector whose clean calibration scores all tie (scale falls back to a tiny std) puts a
    far score's tail p-value below the smallest float; the guard must still calibrate and rank it."""
    tied = np.zeros(100)
    far = tail_pvalues(tied, np.array([0.0, 1.0]))
    assert far[1] == 0.0  # underflows
    cal = {"tied": tied, "smooth": np.random.default_rng(0).normal(size=100)}
    guard = combine_pvalues({"tied": far, "smooth": np.array([0.5, 0.5])})
    assert np.isfinite(guard).all() and guard[1] > guard[0]
    scores = in_sample_guard_scores({**cal, "tied": np.r_[np.zeros(99), 1.0]})
    assert np.isfinite(scores).all()
    assert calibrate_guard(cal, 0.05) is not None


def test_guard_false_positive_rate_on_unseen_clean_inputs_is_near_target(setup):
    """Over random splits of clean scores into calibration and unseen parts, the guard's FPR averages
    close to the 5% target; one split of ~150 calibration inputs varies by about +-2.5 points."""
    guard = setup["guard"]
    unseen = guard.screen(setup["data"].test.x)  # all clean test inputs, as a deployed guard sees them
    assert unseen.flagged.mean() <= 0.15
    pool = {k: np.r_[guard.calibration_scores_[k], unseen.scores[k]] for k in unseen.scores}
    n_cal, n_all = len(guard.calibration_scores_["mahalanobis"]), len(pool["mahalanobis"])
    rng = np.random.default_rng(0)
    fprs = []
    for _ in range(200):
        perm = rng.permutation(n_all)
        cal, new = perm[:n_cal], perm[n_cal:]
        threshold = calibrate_guard({k: v[cal] for k, v in pool.items()}, 0.05)
        score = combine_pvalues({k: tail_pvalues(v[cal], v[new]) for k, v in pool.items()})
        fprs.append(threshold.flags(score).mean())
    assert 0.03 <= np.mean(fprs) <= 0.05 + 1.5 / n_cal  # target plus the conformal discreteness term


def test_guard_catches_and_types_backdoor_and_adversarial_inputs(setup):
    bd = Counter(setup["guard"].screen(setup["backdoor"]).verdict)
    cw = Counter(setup["guard"].screen(setup["cw"]).verdict)
    n_bd, n_cw = sum(bd.values()), sum(cw.values())
    # measured on this fixture: 98% of BadNets inputs called backdoor, 73% of CW examples adversarial
    assert bd["backdoor"] / n_bd >= 0.9 and bd["adversarial"] / n_bd <= 0.05
    assert cw["adversarial"] / n_cw >= 0.6 and cw["backdoor"] / n_cw <= 0.05


def test_screen_reports_prediction_and_every_detector_score(setup):
    res = setup["guard"].screen(setup["clean"][:7])
    assert len(res) == 7 and set(res.scores) == {"mutation_adv", "mutation_bd", "kd_bu", "mahalanobis"}
    np.testing.assert_array_equal(res.prediction, predict(setup["model"], setup["clean"][:7]).numpy())
    row = res.rows()[0]
    assert {"prediction", "verdict", "guard_score", "kd_bu"} <= set(row)


def test_saved_guard_scores_the_same_after_loading(setup, tmp_path):
    path = setup["guard"].save(tmp_path / "g.safetensors")
    loaded = Guard.load(path, setup["model"])
    x = torch.cat([setup["clean"][:30], setup["backdoor"][:30]])
    a, b = setup["guard"].screen(x), loaded.screen(x)
    np.testing.assert_array_equal(a.guard_score, b.guard_score)
    assert a.verdict == b.verdict
    for k in a.scores:
        np.testing.assert_array_equal(a.scores[k], b.scores[k])


def test_guard_file_layout_stays_format_version_1(setup, tmp_path):
    """Guards saved by earlier versions must keep loading: the header and tensor names do not move."""
    guard = setup["guard"]
    path = guard.save(tmp_path / "g.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta, names = f.metadata(), set(f.keys())
    header = json.loads(meta["malex"])
    assert set(meta) == {"malex", "digest"}
    assert list(header) == ["format", "version", "model_fingerprint", "config", "threshold", "detectors"]
    assert (header["format"], header["version"]) == ("malex-guard", 1)
    assert set(header["config"]) == {f.name for f in dataclasses.fields(GuardConfig)} - {"progress"}
    assert header["config"]["detectors"] == list(guard.detectors) and list(header["detectors"]) == list(guard.detectors)
    assert set(header["threshold"]) == {"value", "fpr"}
    for name, det in guard.detectors.items():
        exported_meta, tensors = det.export()
        assert header["detectors"][name] == json.loads(json.dumps(exported_meta))
        assert {f"det/{name}/{k}" for k in tensors} | {f"cal/{name}"} <= names
    assert all(n.startswith(("det/", "cal/")) for n in names)
    # a guard that knows its model's source adds one key at the end; a file without it (as above) loads as before
    assert Guard.load(path, guard.model).source is None
    guard.source = {"kind": "malex", "arch": "digits_cnn", "input_shape": [1, 8, 8]}
    try:
        with_source = guard.save(tmp_path / "with_source.safetensors")
    finally:
        guard.source = None
    with safe_open(str(with_source), framework="pt") as f:
        header = json.loads(f.metadata()["malex"])
    assert list(header) == ["format", "version", "model_fingerprint", "config", "threshold", "detectors", "model"]
    assert Guard.load(with_source, guard.model).source == header["model"]


def test_verdict_kinds_come_from_each_detectors_declared_evidence(setup, monkeypatch):
    guard = setup["guard"]
    assert {name: det.evidence for name, det in guard.detectors.items()} == {
        "mutation_adv": ADVERSARIAL, "mutation_bd": BACKDOOR, "kd_bu": None, "mahalanobis": None}
    before = guard.screen(setup["backdoor"])
    assert Counter(before.verdict)[BACKDOOR] >= 0.9 * len(before)
    monkeypatch.setattr(type(guard.detectors["mutation_bd"]), "evidence", ADVERSARIAL)
    after = guard.screen(setup["backdoor"])
    np.testing.assert_array_equal(after.flagged, before.flagged)  # the same inputs flagged, typed the other way
    assert set(after.verdict) <= {BENIGN, ADVERSARIAL}


def test_save_refuses_to_overwrite(setup, tmp_path):
    path = tmp_path / "g.safetensors"
    path.write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        setup["guard"].save(path)
    assert path.read_bytes() == b"keep me"


def test_guard_for_another_model_is_refused(setup, tmp_path):
    path = setup["guard"].save(tmp_path / "g.safetensors")
    other = build_model("digits_cnn", (1, 8, 8), 10)
    with pytest.raises(ModelFileError, match="different model"):
        Guard.load(path, other)


def test_tampered_and_truncated_guard_files_are_refused(setup, tmp_path):
    path = setup["guard"].save(tmp_path / "g.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["cal/kd_bu"] = tensors["cal/kd_bu"] + 1.0  # shift the calibration scores
    save_file(tensors, str(tmp_path / "tampered.safetensors"), metadata=meta)
    with pytest.raises(ModelFileError, match="digest"):
        Guard.load(tmp_path / "tampered.safetensors", setup["model"])
    raw = path.read_bytes()
    (tmp_path / "short.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ModelFileError):
        Guard.load(tmp_path / "short.safetensors", setup["model"])
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelFileError):
        Guard.load(tmp_path / "junk.safetensors", setup["model"])


def test_unfitted_guard_and_bad_inputs_raise(setup):
    guard = Guard(setup["model"], GuardConfig(progress=False))
    with pytest.raises(NotFittedError):
        guard.screen(setup["clean"][:2])
    with pytest.raises(InputError):
        setup["guard"].screen(torch.full((2, 1, 8, 8), float("nan")))
    with pytest.raises(InputError):
        setup["guard"].screen(torch.rand(2, 3, 8, 8))
    with pytest.raises(ConfigError):
        GuardConfig(detectors=("strip", "strip"))
    with pytest.raises(ConfigError):
        GuardConfig(detectors=("no-such",)) and Guard(setup["model"], GuardConfig(detectors=("no-such",)))


def test_too_few_calibration_inputs_for_the_target_fpr_warns(setup):
    data = setup["data"]
    with pytest.warns(UserWarning, match="uncertain"):
        Guard(setup["model"], GuardConfig(detectors=("mutation_adv", "mutation_bd", "strip"), fpr=0.01,
                                          progress=False)).fit(data.val.x[:100], data.val.y[:100])


def test_calibration_scored_in_chunks_equals_scored_at_once(setup, monkeypatch):
    import malex.guard.guard as guard_module

    data = setup["data"]
    config = GuardConfig(detectors=("mutation_adv", "kd_bu", "mahalanobis"), progress=False)
    whole = Guard(setup["model"], config).fit(data.val.x, data.val.y)
    monkeypatch.setattr(guard_module, "CALIBRATION_CHUNK", 7)
    chunked = Guard(setup["model"], config).fit(data.val.x, data.val.y)
    for name, scores in whole.calibration_scores_.items():  # equal up to float32 rounding of other batch sizes
        np.testing.assert_allclose(chunked.calibration_scores_[name], scores, rtol=1e-5, atol=1e-6)
    assert chunked.threshold_.value == pytest.approx(whole.threshold_.value, rel=1e-5)


def test_fit_inputs_beyond_max_fit_go_to_calibration(setup):
    data = setup["data"]
    n = len(data.val.x)
    guard = Guard(setup["model"], GuardConfig(detectors=("mahalanobis",), max_fit=100, progress=False))
    guard.fit(data.val.x, data.val.y)
    assert guard.describe()["n_calibration"] == n - 100
    assert int(guard.detectors["mahalanobis"].class_counts_.sum()) == 100
    roomy = Guard(setup["model"], GuardConfig(detectors=("mahalanobis",), max_fit=None, progress=False))
    assert roomy.fit(data.val.x, data.val.y).describe()["n_calibration"] < n - 100
    with pytest.raises(ConfigError, match="max_fit"):
        GuardConfig(max_fit=5)


def test_groups_are_never_split_between_fit_and_calibration(setup, monkeypatch):
    data = setup["data"]
    n = len(data.val.x)
    x = data.val.x.clone()
    x[:, 0, 0, 0] = torch.arange(n) / n  # a pixel that names each input
    groups = torch.arange(n) // 6  # groups of 6 consecutive inputs
    seen: list[torch.Tensor] = []
    guard = Guard(setup["model"], GuardConfig(detectors=("mahalanobis",), max_fit=60, progress=False))
    real_run = guard.probe.run
    monkeypatch.setattr(guard.probe, "run", lambda xb, *a, **k: seen.append(xb) or real_run(xb, *a, **k))
    guard.fit(x, data.val.y, groups)
    fit_ids = torch.round(seen[0][:, 0, 0, 0] * n).long()
    assert len(fit_ids) <= 60 and len(fit_ids) + guard.describe()["n_calibration"] == n
    in_fit = groups[fit_ids].unique()
    assert int(torch.isin(groups, in_fit).sum()) == len(fit_ids)  # whole groups only


# ------------------------------------- guard files edited with their digest recomputed; keyed signatures


def _edited(src, dst, header_edit=None, tensor_edit=None, keep_signature=False):
    """A copy of the guard file `src` at `dst` with its header and/or tensors edited and its digest recomputed,
    as someone who read malex's source could do."""
    from malex.guard.io import _digest

    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(meta["malex"])
    if header_edit:
        header_edit(header)
    if tensor_edit:
        tensor_edit(tensors)
    new = {"malex": json.dumps(header), "digest": _digest(header, tensors)}
    if keep_signature:
        new["signature"] = meta["signature"]
    save_file(tensors, str(dst), metadata=new)
    return dst


def _set(*keys_value):
    *keys, value = keys_value

    def edit(header):
        node = header
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return edit


def _refused_in_one_line(path, model, *needles, key=None):
    with pytest.raises(ModelFileError) as info:
        Guard.load(path, model, key=key)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(path)), msg
    for needle in needles:
        assert needle in msg, msg
    return msg


@pytest.fixture(scope="module")
def saved(setup, tmp_path_factory):
    return setup["guard"].save(tmp_path_factory.mktemp("guard") / "g.safetensors")


@pytest.mark.parametrize("edit, needles", [
    (_set("config", "batch_size", 0), ["batch_size", "0", "expected an int >= 1"]),
    (_set("config", "batch_size", "256"), ["batch_size", "expected an int >= 1"]),
    (_set("config", "fpr", 1.5), ["fpr", "expected a number in [0, 1)"]),
    (_set("threshold", "fpr", -0.1), ["threshold", "expected a number in [0, 1)"]),
    (_set("threshold", "value", "high"), ["threshold value", "expected a finite number"]),
    (_set("config", "calibration_fraction", 2.0), ["calibration_fraction"]),
    (_set("config", "max_fit", 3), ["max_fit"]),
    (_set("config", "seed", -1), ["seed", "expected an int >= 0"]),
    (_set("config", "detectors", ["mahalanobis", "no_such_detector"]), ["no_such_detector"]),
    (_set("config", "settings", {"kd_bu": {"bogus": 1}}), ["bogus"]),
    (_set("config", "extra_field", 1), ["extra_field"]),
    (_set("model_fingerprint", 7), ["model_fingerprint"]),
    (_set("detectors", "kd_bu", "kinds", {"nothing_": "tensor"}), ["kd_bu"]),
])
def test_edited_header_with_recomputed_digest_refused_in_one_line(setup, saved, tmp_path, edit, needles):
    # batch size 0 loaded and ended in a traceback when screening
    path = _edited(saved, tmp_path / "edited.safetensors", header_edit=edit)
    _refused_in_one_line(path, setup["model"], *needles)


def _reshape_first_matrix(name):
    def edit(tensors):
        key = next(k for k, v in tensors.items() if k.startswith(f"det/{name}/") and v.ndim == 2)
        tensors[key] = tensors[key][:, :-1].contiguous()
    return edit


@pytest.mark.parametrize("edit, needles", [
    (_reshape_first_matrix("mahalanobis"), ["mahalanobis"]),
    (_reshape_first_matrix("kd_bu"), ["kd_bu"]),
    (lambda t: t.update({"cal/kd_bu": t["cal/kd_bu"][:-1].clone()}), ["cal/kd_bu", "calibration scores"]),
    (lambda t: t.update({"cal/kd_bu": t["cal/kd_bu"].float()}), ["cal/kd_bu", "float64"]),
    (lambda t: t.update({"cal/kd_bu": t["cal/kd_bu"][:, None].clone()}), ["cal/kd_bu", "1-D"]),
    (lambda t: t["cal/mahalanobis"].__setitem__(0, float("nan")), ["cal/mahalanobis", "finite"]),
    (lambda t: t.pop("cal/mahalanobis"), ["cal/mahalanobis"]),
])
def test_edited_tensors_with_recomputed_digest_refused_in_one_line(setup, saved, tmp_path, edit, needles):
    # a wrong-shape tensor loaded and ended in a traceback from inside a detector when screening
    path = _edited(saved, tmp_path / "edited.safetensors", tensor_edit=edit)
    _refused_in_one_line(path, setup["model"], *needles)


def test_signed_guard_round_trip_and_refusals(setup, tmp_path):
    key = b"a deployment's secret"
    signed = setup["guard"].save(tmp_path / "signed.safetensors", key=key)
    with safe_open(str(signed), framework="pt") as f:
        assert set(f.metadata()) == {"malex", "digest", "signature"}
    loaded = Guard.load(signed, setup["model"], key=key)
    np.testing.assert_array_equal(loaded.screen(setup["clean"][:5]).guard_score,
                                  setup["guard"].screen(setup["clean"][:5]).guard_score)
    Guard.load(signed, setup["model"])  # without a key, the signature is not asked for

    unsigned = setup["guard"].save(tmp_path / "unsigned.safetensors")
    _refused_in_one_line(unsigned, setup["model"], "not signed", key=key)
    _refused_in_one_line(signed, setup["model"], "signature does not match", key=b"another key")
    tampered = _edited(signed, tmp_path / "tampered.safetensors", header_edit=_set("config", "fpr", 0.5),
                       keep_signature=True)
    _refused_in_one_line(tampered, setup["model"], "signature does not match", key=key)


def test_guard_key_from_file_or_environment(tmp_path):
    from malex.guard.signing import KEY_ENV, guard_key

    (tmp_path / "key").write_bytes(b"from the file\n")
    (tmp_path / "empty").write_bytes(b"")
    assert guard_key(None, {}) is None
    assert guard_key(None, {KEY_ENV: "from the env"}) == b"from the env"
    assert guard_key(tmp_path / "key", {KEY_ENV: "from the env"}) == b"from the file"
    for bad, needle in [(tmp_path / "empty", "is empty"), (tmp_path / "missing", "cannot read")]:
        with pytest.raises(ConfigError, match=needle):
            guard_key(bad, {})
    with pytest.raises(ConfigError, match=KEY_ENV):
        guard_key(None, {KEY_ENV: ""})


def test_cli_scan_with_a_key_refuses_an_unsigned_guard_in_one_line(setup, saved, tmp_path, monkeypatch, capsys):
    import sys

    from malex.cli import main
    from malex.guard.signing import KEY_ENV
    from malex.models import save_model

    model = save_model(setup["model"], tmp_path / "m.safetensors", "digits_cnn")
    np.save(tmp_path / "x.npy", setup["clean"][:3].numpy())
    (tmp_path / "key").write_bytes(b"k")
    for env, extra in [({KEY_ENV: "k"}, []), ({}, ["--guard-key-file", str(tmp_path / "key")])]:
        monkeypatch.delenv(KEY_ENV, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setattr(sys, "argv", ["malex", "scan", str(saved), str(tmp_path / "x.npy"), "--model", str(model),
                                          *extra])
        with pytest.raises(SystemExit) as info:
            main()
        err = capsys.readouterr().err.strip()
        assert info.value.code == 2 and "\n" not in err and "not signed" in err, err
