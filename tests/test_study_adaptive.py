"""Adaptive attacks in the study: a digits study with only an adaptive PGD (one clean model, a two-member guard)
runs, its table gives attacker success per budget and target beside plain PGD, the adaptive attack beats plain
PGD against the guard, a rerun recomputes nothing, and bad settings are one-line ConfigErrors naming the key."""

from __future__ import annotations

import copy
import csv
import shutil

import pytest

from malex.errors import ConfigError
from malex.evaluate.study import Study, parse_config

from test_study import digits_raw, shrunk_raw, snapshot

GUARD = ["mahalanobis_penultimate", "msp"]
APGD = {"attack": "adaptive_pgd", "eps": 0.2, "steps": 20, "budget_scale": [1.0, 2.0], "n_sources": 20}


def adaptive_raw() -> dict:
    """The shrunk digits config with only an adaptive PGD, aimed at the guard and at each member alone."""
    raw = shrunk_raw()
    raw["study"].update(detectors=["msp"], guard=GUARD)
    raw["adversarial"]["apgd"] = dict(APGD)
    raw["datasets"]["digits"]["attacks"] = ["apgd"]
    raw["analysis"]["enabled"] = False
    return raw


@pytest.fixture(scope="module")
def adaptive_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("adaptive") / "out"
    study = Study(parse_config(adaptive_raw()), out, progress=False)
    return {"out": out, "run": study.run(), "study": study}


def test_the_table_gives_attacker_success_per_budget_and_target(adaptive_run):
    out, run = adaptive_run["out"], adaptive_run["run"]
    assert run.cells == [] and run.counts["models_trained"] == 1 and run.counts["guards_fitted"] == 1
    assert run.counts["adaptive_runs"] == 2 * (1 + 1 + len(GUARD))  # per budget: plain PGD, guard, each member
    rows = list(csv.DictReader((out / "adaptive.csv").open()))
    assert [(r["eps"], r["target"]) for r in rows] == [(e, t) for e in ("0.2", "0.4") for t in ["guard", *GUARD]]
    for r in rows:
        assert r["n"] == "20"
        success, fooled, flagged = float(r["success"]), float(r["fooled"]), float(r["flagged"])
        assert success <= fooled and success <= 1.0 - flagged + 1e-9
        # aimed at a member, the example is screened by the whole guard too
        assert (r["guard_success"] == "") == (r["target"] == "guard")
    md = (out / "results.md").read_text()
    assert "## Adaptive attacks: attacker success" in md and "### digits / apgd (adaptive_pgd)" in md
    for target in ["guard", *GUARD]:
        assert f"| {target} | 0.2 (1 x) |" in md and f"| {target} | 0.4 (2 x) |" in md
    page = (out / "report/index.html").read_text()
    assert "Adaptive attacks" in page and (out / "report/digits-adaptive.png").is_file()


def test_the_adaptive_attack_beats_plain_pgd_against_the_guard(adaptive_run):
    rows = list(csv.DictReader((adaptive_run["out"] / "adaptive.csv").open()))
    guard = [r for r in rows if r["target"] == "guard"]
    # the guard catches a good share of plain PGD examples; hardly any of the attack that knows it
    assert all(float(r["success"]) > float(r["plain_success"]) for r in guard), guard
    assert max(float(r["success"]) for r in guard) >= 0.8


def test_a_rerun_recomputes_nothing(adaptive_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(adaptive_run["out"], out)
    before = snapshot(out) | {str(p): p.stat().st_mtime_ns for p in (out / "adaptive").rglob("*") if p.is_file()}
    run = Study(parse_config(adaptive_raw()), out, progress=False).run()
    assert all(v == 0 for v in run.counts.values()), run.counts
    after = snapshot(out) | {str(p): p.stat().st_mtime_ns for p in (out / "adaptive").rglob("*") if p.is_file()}
    assert after == before
    # a changed budget scale runs only the new budget
    raw = adaptive_raw()
    raw["adversarial"]["apgd"]["budget_scale"] = [1.0, 2.0, 0.5]
    run = Study(parse_config(raw), out, progress=False).run()
    assert run.counts["adaptive_runs"] == 1 + 1 + len(GUARD) and run.counts["guards_fitted"] == 0


@pytest.mark.parametrize(("edit", "key"), [
    (lambda t: t.update(budget_scale=[1.0, -2.0]), "adversarial.apgd.budget_scale"),
    (lambda t: t.update(budget_scale=[1.0, 8.0]), "adversarial.apgd.budget_scale"),
    (lambda t: t.update(targets=["guard", "lid"]), "adversarial.apgd.targets"),
    (lambda t: t.update(n_sources=0), "adversarial.apgd.n_sources"),
    (lambda t: t.update(targeted=True), "adversarial.apgd.targeted"),
    (lambda t: t.update(wieght=0.1), "adversarial.apgd.wieght"),
    (lambda t: t.update(attack="adaptive_cw"), "adversarial.apgd.attack"),
])
def test_a_bad_adaptive_setting_names_its_key(edit, key):
    raw = copy.deepcopy(digits_raw())
    raw["adversarial"]["apgd"] = dict(APGD)
    edit(raw["adversarial"]["apgd"])
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert key in str(info.value) and "\n" not in str(info.value)


def test_a_guard_member_without_a_surrogate_is_refused():
    raw = copy.deepcopy(digits_raw())
    raw["study"]["guard"] = ["mahalanobis", "strip"]
    raw["adversarial"]["apgd"] = dict(APGD)
    with pytest.raises(ConfigError, match="adversarial.apgd.targets: strip"):
        parse_config(raw)
    raw["adversarial"]["apgd"]["targets"] = ["mahalanobis"]  # aimed at the member that has one: accepted
    assert parse_config(raw).datasets[0].adaptive[0].targets_of(("mahalanobis", "strip")) == ("mahalanobis",)
