"""The study runner: configs/digits.toml shrunk (1 seed, 3 detectors, small n, few epochs) runs end to end,
a rerun redoes nothing, a damaged cell is redone, bad configs name the key, and the report is complete."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from malex.errors import ConfigError, NotFittedError
from malex.evaluate.study import Cell, Selection, Study, load_config, open_study, parse_config
from malex.evaluate.study.config import tomllib

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DETECTORS = ["msp", "mahalanobis_penultimate", "mutation_adv"]


def digits_raw() -> dict:
    return tomllib.loads((CONFIGS / "digits.toml").read_text())


def shrunk_raw() -> dict:
    """The digits config, small enough for a test: one seed, three detectors, two models, few inputs."""
    raw = digits_raw()
    raw["study"].update(seeds=[0], n_clean=80, n_malicious=40, batch_size=64, detectors=DETECTORS,
                        guard=["msp", "mutation_adv"])
    raw["detectors"] = {"mutation_adv": {"max_mutants": 40}}
    raw["datasets"]["digits"]["train"]["epochs"] = 8
    raw["datasets"]["digits"]["attacks"] = ["badnets", "fgsm", "cw"]
    raw["adversarial"]["cw"].update(steps=15, lr=0.1, binary_search_steps=1, c=10.0)
    raw["analysis"].update(n=40, mutants=10, strengths=[0.3, 1.0])
    return raw


def snapshot(root: Path) -> dict[str, int]:
    """mtime (ns) of every cached artifact (not the tables and report, which every run rewrites)."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for sub in ("models", "attacks", "fits", "cells",
                                                                       "analysis")
            for p in (root / sub).rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "out"
    log: list[str] = []
    study = Study(parse_config(shrunk_raw()), out, progress=False, log=log.append)
    run = study.run()
    return {"out": out, "run": run, "study": study, "log": log}


def test_first_run_computes_every_cell_and_measures_them(study_run):
    run, study = study_run["run"], study_run["study"]
    assert [c.attack for c in run.computed] == ["fgsm", "cw", "badnets"]  # the clean model's cells first
    assert run.skipped == []
    assert run.counts["models_trained"] == 2  # clean + badnets-poisoned
    assert run.counts["attacks_crafted"] == 3
    assert run.counts["detectors_fitted"] == 2 * len(DETECTORS)  # once per model, shared by its cells
    assert run.counts["guards_fitted"] == 2
    done, missing = study.results()
    assert missing == [] and len(done) == 3
    cells = {c["attack"]: c for c in done}
    for cell in done:
        assert [r["detector"] for r in cell["rows"]] == DETECTORS + ["guard"]
        for row in cell["rows"]:
            assert 0.0 <= row["auroc"] <= 1.0 and 0.0 <= row["detection_accuracy"] <= 1.0
            assert row["n_clean"] == 80 and row["n_malicious"] == 40
            assert row["clean_fpr"] == pytest.approx(1.0 - row["clean_pass"])
    rows = {c: {r["detector"]: r for r in cells[c]["rows"]} for c in cells}
    # the penultimate-layer Mahalanobis floor catches BadNets inputs; MSP catches confidence-0 CW examples
    assert rows["badnets"]["mahalanobis_penultimate"]["auroc"] > 0.9
    assert rows["cw"]["msp"]["auroc"] > 0.9
    assert cells["badnets"]["model_summary"]["attack_success_rate"] > 0.5
    # targeted CW: every kept example is classified as its target, which differs from its source's label
    from malex.evaluate.study.cache import read_tensors
    from malex.models import load_model
    from malex.models.inference import predict

    out = study_run["out"]
    meta, tensors = read_tensors(out / "attacks/digits/seed0/cw.safetensors")
    model, _ = load_model(out / "models/digits/seed0/clean.safetensors")
    assert len(tensors["x"]) == 40
    assert torch.equal(predict(model, tensors["x"]), tensors["label"])
    assert meta["summary"]["n"] == 40


def test_tables_are_written(study_run):
    out = study_run["out"]
    md = (out / "results.md").read_text()
    assert "### AUROC" in md and "| guard |" in md and "mahalanobis_penultimate" in md
    lines = (out / "results.csv").read_text().splitlines()
    assert lines[0].startswith("dataset,attack,kind,method,model,seed,detector,auroc")
    assert len(lines) == 1 + 3 * (len(DETECTORS) + 1)
    summary = (out / "summary.csv").read_text().splitlines()
    assert len(summary) == 1 + 3 * (len(DETECTORS) + 1)


def test_rerun_redoes_nothing(study_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(study_run["out"], out)  # copy2 keeps mtimes
    before = snapshot(out)
    log: list[str] = []
    run = Study(parse_config(shrunk_raw()), out, progress=False, log=log.append).run()
    assert run.computed == [] and len(run.skipped) == 3
    assert all(v == 0 for v in run.counts.values()), run.counts
    assert sum("finished earlier, skipped" in line for line in log) == 3
    assert snapshot(out) == before


def test_damaged_cell_is_redone(study_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(study_run["out"], out)
    metrics = out / "cells/digits/fgsm/seed0/metrics.json"
    text = metrics.read_text()
    metrics.write_text(text[: len(text) // 2])  # a half-written file
    scores = out / "cells/digits/badnets/seed0/scores/msp.safetensors"
    scores.write_bytes(scores.read_bytes()[:-16])  # truncated
    run = Study(parse_config(shrunk_raw()), out, progress=False).run(report=False)
    assert sorted(c.attack for c in run.computed) == ["badnets", "fgsm"]
    assert run.counts["models_trained"] == run.counts["attacks_crafted"] == run.counts["detectors_fitted"] == 0
    assert run.counts["detector_scores"] == 1  # only the damaged score file; the fgsm scores were intact
    assert json.loads(metrics.read_text())["rows"] == json.loads(
        (study_run["out"] / "cells/digits/fgsm/seed0/metrics.json").read_text())["rows"]


def test_a_selected_part_is_computed_and_the_tables_cover_the_whole_grid(study_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(study_run["out"], out)
    for attack in ("badnets", "fgsm"):
        (out / f"cells/digits/{attack}/seed0/metrics.json").unlink()
    (out / "attacks/digits/seed0/badnets.safetensors").unlink()
    for analysis in (out / "analysis").rglob("*.safetensors"):
        analysis.unlink()
    log: list[str] = []
    study = Study(parse_config(shrunk_raw()), out, progress=False, log=log.append)
    run = study.run(report=False, select=Selection.of(attacks=["fgsm"]))
    assert [c.attack for c in run.computed] == ["fgsm"] and len(run.cells) == 1
    assert run.counts["attacks_crafted"] == 0 and run.counts["analyses"] == 1  # the clean model's; not badnets'
    assert any("badnets model / seed 0 waits for its model and attacks" in line for line in log)
    md = (out / "results.md").read_text()
    assert "## Cells not finished" in md and "- digits / badnets / seed 0" in md and "### fgsm" in md
    with pytest.raises(ConfigError, match="no attack wanet.*expected one of badnets, cw, fgsm"):
        study.run(select=Selection.of(attacks=["wanet"]))
    with pytest.raises(ConfigError, match="no seed 7"):
        study.run(select=Selection.of(seeds=[7]))


def test_cells_measure_the_guards_verdicts_on_a_mixed_stream(study_run):
    done, _ = study_run["study"].results()
    for cell in done:
        v = cell["verdict"]
        matrix = np.array(v["confusion"])
        assert v["labels"] == ["benign", "adversarial", "backdoor"]
        kind = v["labels"].index(cell["kind"])
        other = 3 - kind  # the malicious kind it is not
        assert matrix[0].sum() == 80 and matrix[kind].sum() == 40 and matrix[other].sum() == 0
        guard = next(r for r in cell["rows"] if r["detector"] == "guard")
        assert matrix[0, 0] / 80 == pytest.approx(guard["clean_pass"])  # clean inputs not flagged are benign
        assert matrix[kind, 1:].sum() / 40 == pytest.approx(guard["malicious_caught"])
        assert v["accuracy"] == pytest.approx((matrix[0, 0] + matrix[kind, kind]) / 120)
        assert v["typed_right"] == pytest.approx(matrix[kind, kind] / 40)
        members = [r for r in cell["rows"] if r["detector"] in ("msp", "mutation_adv")]
        assert v["gap_member_auroc"] == pytest.approx(guard["auroc"] - max(r["auroc"] for r in members))
    md = (study_run["out"] / "results.md").read_text()
    assert "### The guard's verdicts on the mixed stream" in md and "malicious typed right" in md


def test_cells_cached_before_verdicts_load_and_are_measured_without_refitting(study_run, tmp_path):
    """A folder written before verdicts were recorded: its cells still load (tables, report); a run measures
    their verdicts from the cached models, attacks, scores and guard files."""
    from malex.evaluate.study.cache import read_tensors, write_tensors

    out = tmp_path / "out"
    shutil.copytree(study_run["out"], out)
    for path in list(out.glob("fits/digits/seed0/*/guard-clean.safetensors")) + list(out.glob("cells/*/*/*/guard.safetensors")):
        meta, tensors = read_tensors(path)
        write_tensors(path, {k: v for k, v in tensors.items() if k != "verdict"}, meta)
    for path in out.glob("cells/*/*/*/metrics.json"):
        metrics = json.loads(path.read_text())
        metrics.pop("verdict")
        path.write_text(json.dumps(metrics))
    study = Study(parse_config(shrunk_raw()), out, progress=False)
    done, missing = study.results()
    assert missing == [] and len(done) == 3 and all("verdict" not in c for c in done)
    assert "| guard |" in (study.write_tables()["results_md"]).read_text()
    run = study.run(report=False)
    assert len(run.computed) == 3
    assert run.counts["models_trained"] == run.counts["attacks_crafted"] == run.counts["detectors_fitted"] == 0
    assert run.counts["guards_fitted"] == run.counts["detector_scores"] == 0
    before = {c["attack"]: c for c in study_run["study"].results()[0]}
    for cell in study.results()[0]:
        assert cell["verdict"]["confusion"] == before[cell["attack"]]["verdict"]["confusion"]
        assert cell["rows"] == before[cell["attack"]]["rows"]


def test_changed_setting_redoes_what_depends_on_it(study_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(study_run["out"], out)
    raw = shrunk_raw()
    raw["adversarial"]["fgsm"]["eps"] = 0.3
    run = Study(parse_config(raw), out, progress=False).run(report=False)
    assert [c.attack for c in run.computed] == ["fgsm"]
    assert run.counts["attacks_crafted"] == 1 and run.counts["models_trained"] == 0


def test_report_is_complete_and_offline(study_run):
    page = study_run["run"].files["report"]
    html = page.read_text()
    images = re.findall(r'<img src="([^"]+)"', html)
    assert len(images) == 5  # verdicts, ROC, sensitivity, activation, feature space
    for src in images:
        assert (page.parent / src).is_file() and (page.parent / src).stat().st_size > 1000
    assert "<script" not in html and "http://" not in html and "https://" not in html
    import html as html_lib

    text = html_lib.unescape(html)
    assert any(src.endswith("-verdicts.png") for src in images)
    for title in ("Sensitivity space", "Activation space", "Feature space", "ROC curves", "AUROC", "The guard's verdicts"):
        assert title in text


def test_report_command_rebuilds_from_the_folder(study_run, tmp_path):
    from typer.testing import CliRunner

    from malex.cli import app

    out = tmp_path / "out"
    shutil.copytree(study_run["out"], out)
    shutil.rmtree(out / "report")
    result = CliRunner().invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "report" / "index.html").is_file()
    assert open_study(out).cell_finished(Cell("digits", "cw", 0))


def test_output_folder_of_something_else_is_refused(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds no malex study"):
        Study(parse_config(shrunk_raw()), tmp_path, progress=False).run()
    assert (tmp_path / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize(("edit", "key"), [
    (lambda r: r["study"].update(seed=[0]), "study.seed"),
    (lambda r: r["study"].update(fpr=2.0), "study.fpr"),
    (lambda r: r["study"].update(detectors=["msp", "nope"]), "study.detectors"),
    (lambda r: r["study"].update(n_clean="many"), "study.n_clean"),
    (lambda r: r.update(extra={}), "config.extra"),
    (lambda r: r["datasets"]["digits"].update(epochs=3), "datasets.digits.epochs"),
    (lambda r: r["datasets"]["digits"].update(arch="resnet9000"), "datasets.digits.arch"),
    (lambda r: r["datasets"]["digits"]["train"].update(epochs=0), "datasets.digits.train"),
    (lambda r: r["datasets"]["digits"]["train"].update(epoch=3), "datasets.digits.train.epoch"),
    (lambda r: r["datasets"]["digits"].update(attacks=["badnets", "nope"]), "datasets.digits.attacks"),
    (lambda r: r["backdoors"]["badnets"].update(sise=3), "backdoors.badnets.sise"),
    (lambda r: r["backdoors"]["badnets"].update(trigger="nope"), "backdoors.badnets.trigger"),
    (lambda r: r["adversarial"]["cw"].update(stepz=3), "adversarial.cw.stepz"),
    (lambda r: r["adversarial"]["cw"].update(confidence=-1.0), "adversarial.cw"),
    (lambda r: r["adversarial"]["cw"].update(attack="adaptive_cw"), "adversarial.cw.attack"),
    (lambda r: r.update(detectors={"msp": {"temperature": 0.0}}), "detectors.msp"),
    (lambda r: r.update(detectors={"msp": {"temprature": 1.0}}), "detectors.msp"),
    (lambda r: r["analysis"].update(embedding="umap"), "analysis.embedding"),
    (lambda r: r["datasets"]["digits"].update(attack_settings={"pgd": {"eps": 2.0}}),
     "datasets.digits.attack_settings.pgd"),
])
def test_bad_config_names_the_key(edit, key):
    raw = copy.deepcopy(digits_raw())
    edit(raw)
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert key in str(info.value)


def test_config_files_parse():
    cfg = load_config(CONFIGS / "digits.toml")
    ds = cfg.datasets[0]
    assert cfg.seeds == (0, 1, 2) and ds.model_keys == ("clean", "badnets", "blend")
    assert {"msp", "mahalanobis_penultimate"} <= set(ds.detectors)
    assert ds.attack("cw").targeted and ds.attack("cw").settings["confidence"] == 0.0
    from malex.attacks.backdoor import TRIGGERS
    from malex.models import ARCHITECTURES

    for name, seeds in (("mnist_gtsrb.toml", 3), ("cifar10.toml", 3), ("cifar10_cpu.toml", 3)):
        raw = tomllib.loads((CONFIGS / name).read_text())
        needed = {t.get("trigger", n) for n, t in raw.get("backdoors", {}).items()}
        archs = {d["arch"] for d in raw["datasets"].values()}
        assert needed <= set(TRIGGERS), f"{name} names unregistered triggers {needed - set(TRIGGERS)}"
        assert archs <= set(ARCHITECTURES), f"{name} names unregistered architectures {archs - set(ARCHITECTURES)}"
        cfg = load_config(CONFIGS / name)
        assert len(cfg.seeds) == seeds
        for ds in cfg.datasets:
            assert {"msp", "mahalanobis_penultimate"} <= set(ds.detectors) and ds.guard


# --- the floors ----------------------------------------------------------------------------------------------

def test_msp_separates_low_confidence_inputs(study_run):
    from malex.data import load_digits
    from malex.detectors import make_detector
    from malex.metrics import auroc
    from malex.models import load_model
    from malex.models.inference import predict_logits

    model, _ = load_model(study_run["out"] / "models/digits/seed0/clean.safetensors")
    data = load_digits(0)
    det = make_detector("msp", model)
    with pytest.raises(NotFittedError):
        det.score(det.observe(data.test.x[:4]))
    det.fit(det.observe(data.val.x))
    clean = det.score(det.observe(data.test.x))
    # obviously low-confidence: each test digit averaged with a digit of another class
    other = torch.roll(data.test.x, 1, 0)
    mixed = 0.5 * data.test.x + 0.5 * other
    keep = data.test.y != torch.roll(data.test.y, 1, 0)
    low = det.score(det.observe(mixed[keep]))
    assert auroc(clean, low) > 0.9
    expected = 1.0 - torch.softmax(predict_logits(model, data.test.x).double(), 1).max(1).values.numpy()
    np.testing.assert_allclose(clean, expected, atol=1e-6)
    with pytest.raises(ConfigError):
        make_detector("msp", model, temperature=-1.0)


def test_penultimate_mahalanobis_reads_one_layer(digits_model):
    from malex.detectors import make_detector
    from malex.detectors.stats import penultimate_layer

    det = make_detector("mahalanobis_penultimate", digits_model)
    assert det.layers() == [penultimate_layer(digits_model)] == ["head.2"]
    with pytest.raises(ConfigError):
        make_detector("mahalanobis_penultimate", digits_model, layers=("features.4",))


def test_unscored_inputs_count_as_flagged_and_seeds_use_sample_std():
    from malex.report.aggregate import fmt, mean_std
    from malex.metrics import unscored_as_suspicious

    clean, malicious, n = unscored_as_suspicious(np.array([0.1, 0.2, np.nan]), np.array([np.inf, 0.5, -np.inf]))
    assert n == 3 and np.isfinite(clean).all() and np.isfinite(malicious).all()
    assert clean[2] > 0.5 and malicious[0] > 0.5 and malicious[2] < 0.1
    assert mean_std([1.0, 3.0]) == pytest.approx((2.0, 2 ** 0.5))
    assert fmt(*mean_std([0.5])) == "0.500 ± –" and fmt(*mean_std([])) == "–"


def test_floor_and_claim_tables_compare_the_right_rows():
    from malex.report.aggregate import claim_table, floor_table

    def row(attack, kind, detector, auroc, tpr1=0.5, acc=0.9):
        return {"dataset": "d", "attack": attack, "kind": kind, "detector": detector, "auroc": (auroc, 0.01),
                "tpr_at_1fpr": (tpr1, 0.0), "detection_accuracy": (acc, 0.0)}

    summary = [
        row("bd", "backdoor", "msp", 0.70), row("bd", "backdoor", "mahalanobis_penultimate", 0.99),
        row("bd", "backdoor", "lid", 0.98), row("bd", "backdoor", "guard", 0.999, acc=0.97),
        row("adv", "adversarial", "msp", 0.90), row("adv", "adversarial", "mahalanobis_penultimate", 0.80),
        row("adv", "adversarial", "nic", 0.95), row("adv", "adversarial", "guard", 1.0, acc=0.80),
    ]
    floors = ("msp", "mahalanobis_penultimate")
    _, body = floor_table(summary, "d", floors)
    assert body[0][1].startswith("mahalanobis_penultimate: 0.990") and body[0][2].startswith("lid: 0.980")
    assert body[0][4] == "below (-0.010)" and body[1][4] == "above (+0.050)"
    _, claim = claim_table(summary, "d", floors)
    assert claim[0][0].startswith("backdoor") and claim[0][2].startswith("0.970")
    assert claim[1][0].startswith("adversarial") and claim[1][2].startswith("0.800") and claim[1][4].startswith("0.950")


# --- backdoors not learnt: the ASR floor ---------------------------------------------------------------------

def test_the_asr_floor_defaults_to_085_and_one_outside_0_1_is_a_one_line_error_naming_the_key():
    assert parse_config(shrunk_raw()).asr_floor == 0.85
    for floor in (0, 0.5, 1.0):
        raw = shrunk_raw()
        raw["study"]["asr_floor"] = floor
        assert parse_config(raw).asr_floor == floor
    for bad in (1.5, -0.1, float("nan"), "high", True):
        raw = shrunk_raw()
        raw["study"]["asr_floor"] = bad
        with pytest.raises(ConfigError) as info:
            parse_config(raw)
        message = str(info.value)
        assert message.startswith("study.asr_floor: ") and "expected a number in [0, 1]" in message
        assert "\n" not in message


def test_a_backdoor_below_the_asr_floor_is_marked_in_every_table_and_nothing_is_recomputed(study_run, tmp_path):
    """A copy of the finished study whose BadNets model recorded an ASR of 0.44: a rerun computes nothing, and
    every table, CSV and the report say 'not learnt' where its numbers were."""
    import html as html_lib

    out = tmp_path / "out"
    shutil.copytree(study_run["out"], out)
    path = out / "cells/digits/badnets/seed0/metrics.json"
    metrics = json.loads(path.read_text())
    metrics["model_summary"]["attack_success_rate"] = 0.44
    path.write_text(json.dumps(metrics))
    before = snapshot(out)
    run = Study(parse_config(shrunk_raw()), out, progress=False).run()
    assert run.computed == [] and all(v == 0 for v in run.counts.values()) and snapshot(out) == before

    mark = "not learnt (ASR 0.440 < 0.85)"
    md = (out / "results.md").read_text()
    lines = md.splitlines() + [""]
    body = [line for i, line in enumerate(lines[:-1]) if line.startswith("| ") and not lines[i + 1].startswith("|---")]
    section = md.split("### badnets (backdoor)")[1].split("###")[0].splitlines()
    rows = [line for line in body if "badnets" in line or line in section]
    assert len(rows) == 5 + len(DETECTORS) + 1  # models, attacks, floor, claim, verdicts; the attack's own table
    for line in rows:
        assert "not learnt" in line, line
    auroc = md.split("### AUROC")[1].split("###")[0].splitlines()
    cells = [[c.strip(" |") for c in line.split(" | ")] for line in auroc if line.startswith("| ")]
    column = next(i for i, title in enumerate(cells[0]) if title.startswith("badnets"))
    assert [row[column] for row in cells[1:]] == [mark] * (len(DETECTORS) + 1)
    assert "seed 0 not learnt (ASR 0.440 < 0.85)" in md and "not learnt, left out: badnets" in md

    import csv

    with open(out / "results.csv") as handle:
        learnt = {(r["attack"], r["learnt"]) for r in csv.DictReader(handle)}
    assert learnt == {("badnets", "False"), ("fgsm", ""), ("cw", "")}
    with open(out / "summary.csv") as handle:
        summary = [r for r in csv.DictReader(handle) if r["attack"] == "badnets"]
    assert summary and all((r["n_seeds"], r["n_not_learnt"], r["auroc_mean"]) == ("0", "1", "") for r in summary)
    page = html_lib.unescape((run.files["report"]).read_text())
    assert page.count(mark) >= len(DETECTORS) + 1
    roc = Study(parse_config(shrunk_raw()), out, progress=False).report_view().datasets[0].roc
    assert set(roc) == {"fgsm", "cw", "badnets (not learnt: ASR 0.440 < 0.85)"}


def test_the_mean_of_a_backdoor_column_holds_only_its_learnt_seeds(study_run):
    """Three seeds of the BadNets cell (seed 2's ASR 0.44 below the floor): every mean is over seeds 0 and 1 and
    says so; seed 2 stays in the per-seed rows."""
    from malex.evaluate.study.cell import mark_learnt
    from malex.report.aggregate import fmt, markdown, mean_std, summarise, summarise_verdicts

    done, _ = study_run["study"].results()
    badnets = next(c for c in done if c["attack"] == "badnets")

    def seed(s: int, asr: float, auroc: float) -> dict:
        cell = copy.deepcopy(badnets)
        cell["seed"], cell["model_summary"]["attack_success_rate"] = s, asr
        for row in cell["rows"]:
            row["auroc"] = auroc
        return cell

    cells = mark_learnt([c for c in done if c is not badnets] + [seed(0, 1.0, 0.9), seed(1, 0.9, 0.6),
                                                                    seed(2, 0.44, 0.1)], 0.85)
    assert [c["learnt"] for c in cells if c["attack"] == "badnets"] == [True, True, False]
    assert {c["learnt"] for c in cells if c["kind"] == "adversarial"} == {None}
    summary = summarise(cells)
    guard = next(s for s in summary if s["attack"] == "badnets" and s["detector"] == "guard")
    assert guard["seeds"] == [0, 1] and guard["not_learnt"] == [(2, 0.44)]
    assert guard["auroc"] == pytest.approx(mean_std([0.9, 0.6]))
    verdicts = next(v for v in summarise_verdicts(cells) if v["attack"] == "badnets")
    assert (np.asarray(verdicts["confusion"]) == 2 * np.asarray(badnets["verdict"]["confusion"])).all()
    md = markdown(cells, summary, [], seeds=[0, 1, 2], fpr=0.05)
    assert f"| guard | {fmt(*mean_std([0.9, 0.6]))} (2 of 3 seeds; 1 not learnt) |" in md
    assert "2 of 3 seeds; seed 2 not learnt (ASR 0.440 < 0.85)" in md


def test_a_backdoor_fine_tuned_from_the_cached_clean_model_is_its_own_artifact(study_run, tmp_path):
    """fine_tune: the BadNets model is the cached clean model trained further on poisoned data. Only that model
    is made (the clean model and its cells are read), its record names the clean model it came from, a rerun
    redoes nothing, and a bad fine_tune setting names its key."""
    from malex.evaluate.study.on_ray import model_tasks, waits_for

    out = tmp_path / "out"
    shutil.copytree(study_run["out"], out)
    raw = shrunk_raw()
    raw["backdoors"]["badnets"]["fine_tune"] = {"epochs": 3}
    log: list[str] = []
    study = Study(parse_config(raw), out, progress=False, log=log.append)
    run = study.run(report=False)
    assert [c.attack for c in run.computed] == ["badnets"] and run.counts["models_trained"] == 1
    assert any("fine-tuning the clean model on data poisoned with badnets (3 epochs)" in line for line in log)
    seed_run = study._seed_run("digits", 0)
    clean, tuned = seed_run.recorded_model("clean"), seed_run.recorded_model("badnets")
    assert tuned["spec"]["fine_tuned_from"] == clean["id"] and tuned["spec"]["backdoor"]["fine_tune"] == {"epochs": 3}
    done = {c["attack"]: c for c in study.results()[0]}
    assert done["badnets"]["model_summary"]["attack_success_rate"] > 0.5 and done["badnets"]["learnt"] is not None
    again = Study(parse_config(raw), out, progress=False).run(report=False)
    assert again.computed == [] and all(v == 0 for v in again.counts.values())

    config = parse_config(raw)
    tasks = model_tasks(config)
    assert [waits_for(t, tasks, [], config) for t in tasks] == [False, True]  # badnets waits for the clean model
    assert waits_for(tasks[1], [tasks[1]], [tasks[0]], config) and not waits_for(tasks[1], [tasks[1]], [], config)
    raw["backdoors"]["badnets"]["fine_tune"] = {"epoch": 3}
    with pytest.raises(ConfigError, match="backdoors.badnets.fine_tune.epoch"):
        parse_config(raw)


def test_the_grid_on_ray_gives_the_tables_of_the_local_run(study_run, tmp_path, ray_local):
    """Two Ray workers (a local instance on loopback), one task per model: the same cells, tables and analyses
    as the local run, and a local rerun reads the Ray run's artifacts."""
    from malex.evaluate.study.on_ray import model_tasks, run_study_on_ray

    config = parse_config(shrunk_raw())
    assert [(t.key, t.attacks) for t in model_tasks(config)] == [("clean", ("fgsm", "cw")), ("badnets", ("badnets",))]
    run, tasks = run_study_on_ray(Study(config, tmp_path / "out", progress=False), None, "local", 2, report=False)
    assert sorted(c.attack for c in run.computed) == ["badnets", "cw", "fgsm"] and len(tasks) == 2
    assert all(t.worker != f"{socket.gethostname()}:{os.getpid()}" for t in tasks)  # run by Ray workers
    for table in ("results.csv", "summary.csv", "results.md"):
        assert (tmp_path / "out" / table).read_text() == (study_run["out"] / table).read_text(), table
    assert sorted(p.name for p in (tmp_path / "out" / "analysis").rglob("*.safetensors")) == \
        sorted(p.name for p in (study_run["out"] / "analysis").rglob("*.safetensors"))
    again = Study(config, tmp_path / "out", progress=False).run(report=False)
    assert again.computed == [] and again.counts["models_trained"] == 0  # a local rerun redoes nothing


def test_cli_study_on_ray_without_ray_is_one_line(tmp_path, monkeypatch, capsys):
    import sys

    from malex.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    monkeypatch.setattr(sys, "argv", ["malex", "study", str(CONFIGS / "digits.toml"), "--out", str(tmp_path / "out"),
                                      "--ray", "--quiet"])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and "\n" not in err and "pip install 'malex[ray]'" in err, err
    assert not (tmp_path / "out").exists()  # refused before the folder was claimed


@pytest.mark.parametrize(("cluster", "device", "cpus", "gpus", "expected"), [
    ({"CPU": 8.0}, "auto", 1, None, {"num_cpus": 1, "num_gpus": 0.0}),
    ({"CPU": 8.0, "GPU": 2.0}, "auto", 2, None, {"num_cpus": 2, "num_gpus": 1.0}),
    ({"CPU": 8.0, "GPU": 2.0}, "cpu", 1, None, {"num_cpus": 1, "num_gpus": 0.0}),
    ({"CPU": 8.0, "GPU": 2.0}, "cuda", 1, 0.5, {"num_cpus": 1, "num_gpus": 0.5}),
])
def test_ray_tasks_ask_for_a_gpu_where_the_cluster_has_one(cluster, device, cpus, gpus, expected):
    from malex.evaluate.study.on_ray import task_resources

    assert task_resources(cluster, device, cpus, gpus) == expected


@pytest.mark.parametrize(("cluster", "device", "cpus", "gpus", "needle"), [
    ({"CPU": 8.0}, "auto", 1, 1.0, "the cluster has 0 GPU(s)"),
    ({"CPU": 8.0, "GPU": 1.0}, "cpu", 1, 1.0, "0 for device 'cpu'"),
    ({"CPU": 8.0}, "auto", 0, None, "--cpus-per-task 0; expected an int >= 1"),
])
def test_ray_task_resources_the_cluster_cannot_give_are_refused(cluster, device, cpus, gpus, needle):
    from malex.evaluate.study.on_ray import task_resources

    with pytest.raises(ConfigError) as info:
        task_resources(cluster, device, cpus, gpus)
    assert needle in str(info.value)


def test_the_guards_decision_is_a_config_choice_and_part_of_the_guards_record():
    from malex.evaluate.study.guards import guard_config
    from malex.evaluate.study.specs import Specs

    raw = shrunk_raw()
    default = parse_config(raw).dataset("digits")
    raw["study"].update(guard_combination="cauchy")
    raw["datasets"]["digits"].update(guard_typing="learned", guard_typing_settings={"no_trigger": "adversarial"})
    chosen = parse_config(raw).dataset("digits")
    assert default.guard_decision.describe() == {}  # the shipped guard: its records (and cached guards) unchanged
    assert chosen.guard_decision.describe() == {"combination": "cauchy", "typing": "learned",
                                               "typing_settings": {"no_trigger": "adversarial"}}
    config = parse_config(raw)
    specs = Specs(config, chosen, 0, False)
    assert specs.guard("m")["combination"] == "cauchy" and "combination" not in Specs(
        parse_config(shrunk_raw()), default, 0, False).guard("m")
    made = guard_config(specs)
    assert (made.combination, made.typing, made.typing_settings) == ("cauchy", "learned", {"no_trigger": "adversarial"})


@pytest.mark.parametrize(("edit", "key"), [
    (lambda r: r["study"].update(guard_combination="mean"), "study.guard_*"),
    (lambda r: r["datasets"]["digits"].update(guard_typing="psychic"), "datasets.digits.guard_*"),
    (lambda r: r["datasets"]["digits"].update(guard_typing_settings={"nope": 1}), "datasets.digits.guard_*"),
])
def test_a_bad_guard_decision_names_its_table(edit, key):
    raw = shrunk_raw()
    edit(raw)
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert key in str(info.value)
