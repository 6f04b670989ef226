"""Models malex did not train (issue 14): a factory plus a state_dict (.pt or .safetensors), TorchScript and
torch.export programs, end to end (fit -> save -> load -> screen gives identical scores, predictions equal the
model's own); declared preprocessing inside the model; bad specs end in one line and exit status 2."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from malex.errors import ConfigError, ModelFileError
from malex.guard import Guard, GuardConfig
from malex.guard.io import read_guard_source
from malex.models import ModelSpec, Preprocessing, load
from malex.models.anatomy import find_head
from tests.test_cli import assert_one_error_line, run_cli

NET_SOURCE = '''
import torch
from torch import nn


class Net(nn.Module):
    """A residual conv net with batch norm, a global-average pool and a dense layer named fc."""

    def __init__(self, width=6, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        h = self.stem(x)
        return self.fc(torch.flatten(self.pool(torch.relu(h + self.block(h))), 1))


def broken(**kwargs):
    return "not a module"
'''
DETECTORS = ("mutation_adv", "mahalanobis")
MEAN, STD = (0.3,), (0.4,)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A folder holding tinynet.py (the foreign net) and one file of every kind, for one seeded network."""
    path = tmp_path_factory.mktemp("sources")
    (path / "tinynet.py").write_text(NET_SOURCE)
    sys.path.insert(0, str(path))
    try:
        import tinynet
    finally:
        sys.path.remove(str(path))
    torch.manual_seed(0)
    net = tinynet.Net(width=6).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics, so that a lost buffer changes the outputs
        for bn in (net.stem[1], net.block[1]):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    torch.save(net.state_dict(), path / "model.pt")
    save_file(net.state_dict(), str(path / "model.safetensors"))
    torch.jit.save(torch.jit.script(net), str(path / "model.ts"))
    x = torch.rand(4, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(net, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path / "model.pt2"))
    torch.save(net, path / "pickled_module.pt")  # a whole pickled module: never loaded
    bad = dict(net.state_dict())
    bad["fc.weight"] = bad["fc.weight"].clone()
    bad["fc.weight"][0, 0] = float("nan")
    torch.save(bad, path / "nan.pt")
    torch.save({k: v for k, v in net.state_dict().items() if k != "fc.bias"}, path / "missing.pt")
    np.save(path / "images.npy", np.zeros((2, 1, 8, 8), np.float32))
    (path / "model.onnx").write_bytes(b"\x08\x07")
    return path, net


SPECS = {  # name -> (the kind load reports, the spec)
    "state_dict_pt": ("state_dict", lambda p: ModelSpec(p / "model.pt", "tinynet:Net", {"width": 6}, (1, 8, 8))),
    "state_dict_safetensors": ("state_dict", lambda p: ModelSpec(p / "model.safetensors", "tinynet:Net",
                                                                 {"width": 6}, (1, 8, 8))),
    "torchscript": ("torchscript", lambda p: ModelSpec(p / "model.ts", input_shape=(1, 8, 8))),
    "export": ("export", lambda p: ModelSpec(p / "model.pt2")),  # the program fixed C, H, W
}


@pytest.mark.parametrize("name", list(SPECS))
def test_each_source_fits_saves_loads_and_screens_identically(folder, digits, name, tmp_path, monkeypatch):
    path, net = folder
    monkeypatch.chdir(path)  # the factory is imported from the current folder
    kind, spec = SPECS[name]
    loaded = load(spec(path))
    assert loaded.description["kind"] == kind
    assert loaded.input_shape == (1, 8, 8) and loaded.description["num_classes"] == 10
    x = digits.test.x[:40]
    with torch.no_grad():
        assert torch.equal(loaded.module(x).argmax(1), net(x).argmax(1))
        torch.testing.assert_close(loaded.module(x), net(x), rtol=1e-5, atol=1e-5)
    head = find_head(loaded.module)
    assert head is not None and head.name == "fc"  # the detectors re-run only the dense layer
    guard = Guard(loaded.module, GuardConfig(detectors=DETECTORS, progress=False))
    guard.source = loaded.description
    guard.fit(digits.val.x, digits.val.y)
    first = guard.screen(x)
    guard.save(tmp_path / "guard.safetensors")
    again = load(spec(path))
    restored = Guard.load(tmp_path / "guard.safetensors", again.module)
    second = restored.screen(x)
    assert restored.source["kind"] == loaded.description["kind"]
    np.testing.assert_array_equal(first.prediction, net(x).argmax(1).numpy())
    np.testing.assert_array_equal(second.prediction, first.prediction)
    for det in DETECTORS:
        np.testing.assert_array_equal(second.scores[det], first.scores[det])
    np.testing.assert_array_equal(second.guard_score, first.guard_score)


def test_declared_mean_std_and_value_range_apply_inside_the_model(folder, monkeypatch):
    path, net = folder
    monkeypatch.chdir(path)
    loaded = load(ModelSpec(path / "model.pt", "tinynet:Net", {"width": 6},
                            preprocessing=Preprocessing((0.0, 255.0), (80.0,), (60.0,))))
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), net((x * 255 - 80) / 60))
    assert loaded.description["preprocessing"] == {"value_range": [0.0, 255.0], "mean": [80.0], "std": [60.0]}


def test_guard_records_the_source_and_a_spec_is_completed_or_refused_by_it(folder):
    path, _ = folder
    recorded = {"kind": "state_dict", "arch": "tinynet:Net", "arch_kwargs": {"width": 6}, "input_shape": [1, 8, 8],
                "preprocessing": {"value_range": [0, 1], "mean": list(MEAN), "std": list(STD)}}
    filled = ModelSpec(path / "model.pt", "tinynet:Net").filled_from(recorded)
    assert filled.arch_kwargs == {"width": 6} and filled.input_shape == (1, 8, 8)
    assert filled.preprocessing == Preprocessing((0, 1), MEAN, STD)
    with pytest.raises(ConfigError, match="mean"):
        ModelSpec(path / "model.pt", "tinynet:Net", preprocessing=Preprocessing(mean=(0.5,), std=STD)).filled_from(recorded)
    with pytest.raises(ConfigError, match="fitted for 'tinynet:Net'"):
        ModelSpec(path / "model.pt", "other:Net").filled_from(recorded)


@pytest.mark.parametrize("spec, error, needle", [
    (lambda p: ModelSpec(p / "model.pt", "no_such_module:Net"), ConfigError, "no module 'no_such_module'"),
    (lambda p: ModelSpec(p / "model.pt", "tinynet:Nett"), ConfigError, "no callable 'Nett'"),
    (lambda p: ModelSpec(p / "model.pt", "tinynet:broken"), ConfigError, "expected a torch.nn.Module"),
    (lambda p: ModelSpec(p / "model.pt", "tinynet:Net", {"width": 5}), ModelFileError, "has shape"),
    (lambda p: ModelSpec(p / "missing.pt", "tinynet:Net", {"width": 6}), ModelFileError, "missing ['fc.bias']"),
    (lambda p: ModelSpec(p / "nan.pt", "tinynet:Net", {"width": 6}), ModelFileError, "fc.weight contains NaN"),
    (lambda p: ModelSpec(p / "pickled_module.pt", "tinynet:Net", {"width": 6}), ModelFileError, "state_dict()"),
    (lambda p: ModelSpec(p / "images.npy", "tinynet:Net"), ModelFileError, "not a PyTorch weights file"),
    (lambda p: ModelSpec(p / "model.onnx"), ModelFileError, "ONNX models are not supported"),
    (lambda p: ModelSpec(p / "model.pt"), ConfigError, "--arch module:callable"),
    (lambda p: ModelSpec(p / "model.ts"), ModelFileError, "--input-shape"),
    (lambda p: ModelSpec(p / "model.pt", "tinynet:Net", {"width": 6}, (3, 8, 8)), ModelFileError,
     "does not take inputs of shape (3, 8, 8)"),
])
def test_bad_specs_are_typed_errors(folder, monkeypatch, spec, error, needle):
    path, _ = folder
    monkeypatch.chdir(path)
    with pytest.raises(error) as info:
        load(spec(path))
    assert needle in str(info.value) and "\n" not in str(info.value)


@pytest.fixture(scope="module")
def cli_runs(folder, digits):
    """The CLI runs below, two at a time: a foreign model fitted, scanned and predicted; and bad specs."""
    path, _ = folder
    np.save(path / "inputs.npy", digits.test.x[:12].numpy())
    arch = ["--arch", "tinynet:Net", "--arch-kwargs", '{"width": 6}']
    guard = path / "cli_guard.safetensors"
    runs = {
        "no_module": ["info", path / "model.pt", "--arch", "nowhere.nets:Net"],
        "no_callable": ["info", path / "model.pt", "--arch", "tinynet:Resnet"],
        "wrong_weights": ["info", path / "model.pt", "--arch", "tinynet:Net", "--arch-kwargs", '{"width": 5}'],
        "pickled": ["info", path / "pickled_module.pt", *arch],
        "other_kind": ["info", path / "images.npy", *arch],
        "nan": ["info", path / "nan.pt", *arch],
        "bad_kwargs": ["info", path / "model.pt", "--arch", "tinynet:Net", "--arch-kwargs", "{width: 6}"],
        "predict": ["predict", path / "model.pt", path / "inputs.npy", *arch, "--mean", "0.3", "--std", "0.4",
                    "--input-shape", "1,8,8"],
        "info_export": ["info", path / "model.pt2"],
        "info_given": ["info", path / "model.pt", *arch, "--input-shape", "1,8,8", "--layers", "stem.2, fc:in"],
        "bad_layer": ["info", path / "model.pt2", "--layers", "fc:in,nope"],
        "fit_layers": ["fit", path / "model.pt", *arch, "--data", "digits", "--detectors", "mahalanobis,kd_bu",
                       "--layers", "stem.2,fc:in", "--out", path / "layers_guard.safetensors"],
        "odd_size": ["predict", path / "model.pt2", path / "big_images"],
        "resized": ["predict", path / "model.pt2", path / "big_images", "--resize"],
    }
    from PIL import Image

    (path / "big_images").mkdir(exist_ok=True)
    for i in range(3):
        Image.fromarray((digits.test.x[i, 0].numpy() * 255).astype(np.uint8)).resize((16, 16)).save(
            path / "big_images" / f"{i}.png")
    with ThreadPoolExecutor(2) as pool:
        done = dict(zip(runs, pool.map(lambda args: run_cli(*args, cwd=path), runs.values())))
        fit = run_cli("fit", path / "model.pt", *arch, "--mean", "0.3", "--std", "0.4", "--data", "digits",
                      "--detectors", ",".join(DETECTORS), "--out", guard, cwd=path)
        scans = list(pool.map(lambda extra: run_cli("scan", guard, path / "inputs.npy", "--model", path / "model.pt",
                                                    "--arch", "tinynet:Net", "--format", "jsonl", *extra, cwd=path),
                              [[], ["--mean", "0.5", "--std", "0.4"]]))
    return path, done, fit, scans, guard


@pytest.mark.parametrize("name, needle", [
    ("no_module", "no module 'nowhere.nets'"), ("no_callable", "no callable 'Resnet'"),
    ("wrong_weights", "has shape"), ("pickled", "model.state_dict()"), ("other_kind", "not a PyTorch weights file"),
    ("nan", "NaN"), ("bad_kwargs", "--arch-kwargs is not valid JSON"),
])
def test_cli_bad_specs_end_in_one_line_and_status_2(cli_runs, name, needle):
    assert_one_error_line(cli_runs[1][name], needle)


def test_cli_fit_then_scan_a_foreign_model_with_the_guards_preprocessing(cli_runs, folder, digits):
    path, done, fit, (scan, disagreeing), guard = cli_runs
    _, net = folder
    assert fit.returncode == 0, fit.stderr
    source = read_guard_source(guard)
    assert source["kind"] == "state_dict" and source["arch"] == "tinynet:Net" and source["input_shape"] == [1, 8, 8]
    assert source["preprocessing"]["mean"] == list(MEAN)
    assert scan.returncode == 0, scan.stderr  # --arch-kwargs, --mean, --std and the shape come from the guard
    rows = [json.loads(line) for line in scan.stdout.splitlines()]
    with torch.no_grad():
        own = net((digits.test.x[:12] - MEAN[0]) / STD[0]).argmax(1).tolist()
    assert [r["prediction"] for r in rows] == own
    assert [int(v) for v in done["predict"].stdout.split()] == own
    assert_one_error_line(disagreeing, "but the guard was fitted with")


def test_cli_info_names_kind_head_and_penultimate_layer(cli_runs):
    res = cli_runs[1]["info_export"]
    assert res.returncode == 0, res.stderr
    described = json.loads(res.stdout)
    assert described["kind"] == "export" and described["input_shape"] == [1, 8, 8] and described["num_classes"] == 10
    assert described["head"]["module"] == "fc" and described["penultimate_layer"] == "fc:in"
    mutants = described["backdoor_mutants"]  # a head of one dense layer: mutation_bd fuzzes the last convolution
    assert mutants["reach"] == "last_conv" and mutants["fuzzed"] == ["block.0.weight"], mutants


def test_cli_info_says_which_probe_layers_and_why(cli_runs):
    found = json.loads(cli_runs[1]["info_export"].stdout)["probe_layers"]
    assert found["layers"][-1] == "fc:in" and "traced dummy pass" in found["reason"]
    given = json.loads(cli_runs[1]["info_given"].stdout)["probe_layers"]
    assert given == {"layers": ["stem.2", "fc:in"], "reason": "given with --layers"}
    assert_one_error_line(cli_runs[1]["bad_layer"], "model has no layer 'nope'")


def test_cli_fit_layers_reach_the_feature_space_detectors_and_the_guard_file(cli_runs, folder):
    path, done, *_ = cli_runs
    assert done["fit_layers"].returncode == 0, done["fit_layers"].stderr
    _, net = folder
    guard = Guard.load(path / "layers_guard.safetensors", load(ModelSpec(path / "model.pt", "tinynet:Net",
                                                                         {"width": 6}, (1, 8, 8))).module)
    assert guard.config.settings == {"mahalanobis": {"layers": ["stem.2", "fc:in"]}, "kd_bu": {"layer": "fc:in"}}
    assert guard.detectors["mahalanobis"].layers() == ["stem.2", "fc:in"]


def test_cli_images_of_another_size_are_refused_unless_resized(cli_runs, folder):
    path, done, *_ = cli_runs
    _, net = folder
    assert_one_error_line(done["odd_size"], "16x16")
    assert done["resized"].returncode == 0, done["resized"].stderr
    assert len(done["resized"].stdout.split()) == 3


def test_service_serves_a_foreign_model(folder, digits, monkeypatch):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from malex.serve import BackgroundServer, ServeConfig, create_app

    path, net = folder
    monkeypatch.chdir(path)
    loaded = load(ModelSpec(path / "model.pt2", preprocessing=Preprocessing(mean=MEAN, std=STD)))
    guard = Guard(loaded.module, GuardConfig(detectors=DETECTORS, progress=False)).fit(digits.val.x, digits.val.y)
    server = BackgroundServer(create_app(guard, ServeConfig(max_batch=16), loaded.description)).start()
    try:
        x = digits.test.x[:6].numpy()
        buffer = io.BytesIO()
        np.save(buffer, x)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            answer = client.post("/v1/screen", content=buffer.getvalue(),
                                 headers={"content-type": "application/x-npy"}).json()
            info = client.get("/v1/info").json()
    finally:
        server.stop()
    with torch.no_grad():
        own = net((torch.from_numpy(x) - MEAN[0]) / STD[0]).argmax(1).tolist()
    assert [r["prediction"] for r in answer["results"]] == own
    assert info["model"]["input_shape"] == [1, 8, 8] and info["model"]["num_classes"] == 10
