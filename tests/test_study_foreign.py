"""A study whose architecture is a network of one's own (`module:callable`): trained behind its declared
preprocessing, cached as plain state_dict weights the CLI's --arch reads, resumed without retraining, and
refused in one ConfigError naming the key when the factory or its settings are wrong."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from malex.errors import ConfigError
from malex.evaluate.study import Study, parse_config
from malex.models import ModelSpec, Preprocessing, load
from malex.models.anatomy import find_head
from malex.models.inference import predict
from malex.models.sources import source_kind
from malex.models.trainable import Trainable

from test_study import shrunk_raw

ROOT = Path(__file__).resolve().parents[1]
FACTORY = "examples.own_model.net:TinyResNet"
KWARGS = {"channels": 1, "width": 16, "num_classes": 10}


def foreign_raw() -> dict:
    raw = shrunk_raw()
    digits = raw["datasets"]["digits"]
    digits.update(arch=FACTORY, arch_kwargs=dict(KWARGS), mean=[0.3], std=[0.4], attacks=["badnets", "fgsm"])
    digits["train"].update(epochs=15, lr=3e-3)
    raw["analysis"]["enabled"] = False
    return raw


@pytest.fixture(scope="module")
def foreign_run(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.chdir(ROOT)  # the factory is imported from the current folder, as on the command line
    out = tmp_path_factory.mktemp("foreign") / "out"
    try:
        config = parse_config(foreign_raw())
        run = Study(config, out, progress=False).run(report=False)
        yield {"out": out, "run": run, "config": config}
    finally:
        mp.undo()


def test_a_foreign_network_is_trained_attacked_and_guarded(foreign_run):
    run = foreign_run["run"]
    assert sorted(c.attack for c in run.computed) == ["badnets", "fgsm"]
    assert run.counts["models_trained"] == 2
    done, missing = Study(foreign_run["config"], foreign_run["out"], progress=False).results()
    assert missing == []
    cells = {c["attack"]: c for c in done}
    assert cells["fgsm"]["model_summary"]["clean_accuracy"] > 0.85
    assert cells["badnets"]["model_summary"]["attack_success_rate"] > 0.5
    rows = {r["detector"]: r for r in cells["badnets"]["rows"]}
    # the penultimate features are found on the foreign net (its dense layer's input) and separate the trigger
    assert rows["mahalanobis_penultimate"]["auroc"] > 0.85, rows


def test_its_models_are_plain_weights_that_the_cli_spec_loads(foreign_run, monkeypatch):
    monkeypatch.chdir(ROOT)
    network = foreign_run["config"].dataset("digits").network
    path = foreign_run["out"] / "models" / "digits" / "seed0" / "badnets.safetensors"
    assert path.is_file() and source_kind(path) == "state_dict"
    record = network.record(path)["study"]
    assert record["spec"]["arch"] == FACTORY and record["spec"]["arch_kwargs"] == KWARGS
    cached = network.load(path)
    spec = ModelSpec(path, FACTORY, KWARGS, (1, 8, 8), Preprocessing(mean=(0.3,), std=(0.4,)))
    loaded = load(spec).module
    x = torch.rand(32, 1, 8, 8)
    assert torch.equal(predict(cached, x), predict(loaded, x))
    assert find_head(loaded).name == "net.fc"  # mutation re-runs only the dense layer


def test_a_rerun_trains_nothing(foreign_run, monkeypatch):
    monkeypatch.chdir(ROOT)
    again = Study(foreign_run["config"], foreign_run["out"], progress=False).run(report=False)
    assert again.computed == [] and len(again.skipped) == 2


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.update(arch="nowhere.nets:Net"), "datasets.digits.arch: .*no module 'nowhere.nets'"),
    (lambda d: d.update(arch="examples.own_model.net:Nope"), "datasets.digits.arch: .*no callable 'Nope'"),
    (lambda d: d.update(arch_kwargs={"widht": 3}), "datasets.digits.arch: .*failed .*widht"),
    (lambda d: d.update(arch="digits_cnn"), "datasets.digits.arch: .*digits_cnn.* takes neither"),
    (lambda d: d.update(mean=[0.3], std=[-1.0]), "datasets.digits.arch: std"),
    (lambda d: d.update(arch_kwargs=3), "datasets.digits.arch_kwargs"),
])
def test_a_bad_factory_is_refused_before_training(edit, message, monkeypatch):
    monkeypatch.chdir(ROOT)
    raw = copy.deepcopy(foreign_raw())
    edit(raw["datasets"]["digits"])
    with pytest.raises(ConfigError, match=message):
        parse_config(raw)


def test_wrong_class_count_is_a_config_error():
    network = Trainable(FACTORY, {**KWARGS, "num_classes": 7})
    with pytest.raises(ConfigError, match="gives 7 logits; the data has 10 classes"):
        network.build((1, 8, 8), 10)


def test_the_shipped_own_model_config_parses(monkeypatch):
    from malex.evaluate.study import load_config

    monkeypatch.chdir(ROOT)
    ds = load_config(ROOT / "configs" / "own_model_digits.toml").dataset("digits")
    assert ds.network.foreign and ds.network.preprocessing.mean == (0.3,)
    assert ds.model_keys == ("clean", "badnets", "blend")


def test_the_search_only_variant_differs_only_in_the_guards_typing(monkeypatch):
    from malex.evaluate.study import load_config

    monkeypatch.chdir(ROOT)
    base = load_config(ROOT / "configs" / "own_model_digits.toml").dataset("digits")
    variant = load_config(ROOT / "configs" / "own_model_digits_search_only.toml").dataset("digits")
    assert variant.guard_decision.describe() == {
        "typing": "learned", "typing_settings": {"no_trigger": "adversarial", "with_trigger": "evidence"}}
    assert variant.network == base.network and variant.attacks == base.attacks and variant.train == base.train


def test_the_report_is_rebuilt_where_the_factory_cannot_be_imported(foreign_run, tmp_path, monkeypatch):
    from malex.evaluate.study import open_study

    monkeypatch.chdir(tmp_path)  # examples.own_model is not importable here: not from the folder, the path or
    monkeypatch.setattr(sys, "path", [p for p in sys.path if Path(p or ".").resolve() != ROOT])  # a cache
    for name in [m for m in sys.modules if m == "examples" or m.startswith("examples.")]:
        monkeypatch.delitem(sys.modules, name)
    opened = open_study(foreign_run["out"])
    assert opened.config.dataset("digits").network.arch == FACTORY
    assert {p.name for p in opened.write_tables().values()} >= {"results.md", "results.csv"}
