"""The command line: happy paths, and bad inputs that must end in one `error:` line and a non-zero status."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from malex.models import build_model, load_model, save_model
from malex.models.inference import predict


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    env.pop("FORCE_COLOR", None)  # plain text on a pipe
    return env


def run_cli(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "malex.cli", *map(str, args)], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=300)


def assert_one_error_line(res: subprocess.CompletedProcess, *needles: str) -> str:
    assert res.returncode == 2, f"status {res.returncode}; stderr:\n{res.stderr}"
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{res.stderr}"
    assert lines[0].startswith("error: ") and len(lines[0]) > len("error: ")
    assert res.stdout.strip() == ""
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A valid (untrained) digits model file, written in-process: enough for input validation."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "digits.safetensors"
    return save_model(build_model("digits_cnn", (1, 8, 8), 10), path, "digits_cnn")


def _prepare(folder, model_file, digits) -> dict[str, list]:
    """Write the inputs of every CLI run below into `folder`; return name -> list of argument lists."""
    (folder / "corrupt.safetensors").write_bytes(bytes(range(256)) * 4)
    x = np.zeros((3, 1, 8, 8), np.float32)
    x[2, 0, 4, 4] = np.nan
    np.save(folder / "nan.npy", x)
    np.save(folder / "big.npy", np.full((2, 1, 8, 8), 3.0, np.float32))
    np.save(folder / "shape.npy", np.zeros((2, 1, 9, 9), np.float32))
    rng = np.random.default_rng(0)
    np.savez(folder / "bad.npz", x_train=rng.integers(0, 256, (20, 8, 8), dtype=np.uint8),  # no channel axis
             y_train=np.arange(20) % 2, x_test=rng.integers(0, 256, (4, 8, 8, 1), dtype=np.uint8),
             y_test=np.arange(4) % 2)
    (folder / "taken.safetensors").write_bytes(b"precious bytes")
    np.save(folder / "inputs.npy", digits.test.x[:25].numpy())
    trained = folder / "out.safetensors"
    return {
        "info_corrupt": [["info", folder / "corrupt.safetensors"]],
        "predict_nan": [["predict", model_file, folder / "nan.npy"]],
        "predict_big": [["predict", model_file, folder / "big.npy"]],
        "predict_shape": [["predict", model_file, folder / "shape.npy"]],
        "train_bad_npz": [["train", folder / "bad_out.safetensors", "--data", folder / "bad.npz", "--epochs", 1]],
        "train_existing": [["train", folder / "taken.safetensors", "--epochs", 1]],
        # the happy path: train, then predict with the trained model
        "happy": [["train", trained, "--epochs", 2], ["predict", trained, folder / "inputs.npy"]],
        # the guard's decision chosen on the command line, recorded in its file
        "fit_cauchy": [["fit", model_file, "--detectors", "msp,mahalanobis", "--combination", "cauchy",
                        "--out", folder / "cauchy.safetensors"]],
        "fit_bad_rule": [["fit", model_file, "--combination", "mean", "--out", folder / "mean.safetensors"]],
        "fit_bad_typing": [["fit", model_file, "--typing", "learned", "--typing-settings", "{no",
                            "--out", folder / "typed.safetensors"]],
    }


@pytest.fixture(scope="module")
def cli(tmp_path_factory, model_file, digits):
    """Every CLI run of this module, two at a time (each pays for importing torch in a fresh interpreter).

    Returns (folder, name -> list of CompletedProcess); a chain stops at its first failure.
    """
    folder = tmp_path_factory.mktemp("cli")
    jobs = _prepare(folder, model_file, digits)

    def chain(commands):
        results = []
        for args in commands:
            results.append(run_cli(*args, cwd=folder))
            if results[-1].returncode != 0:
                break
        return results

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(chain, commands) for name, commands in jobs.items()}
        return folder, {name: f.result() for name, f in futures.items()}


# ----------------------------------------------------------------------------------------------- bad inputs


def test_info_on_corrupt_model_file(cli):
    _, runs = cli
    assert_one_error_line(runs["info_corrupt"][0], "corrupt.safetensors", "not a readable safetensors")


def test_predict_with_nan_inputs(cli):
    _, runs = cli
    assert_one_error_line(runs["predict_nan"][0], "nan.npy", "NaN")


def test_predict_with_values_outside_unit_interval(cli):
    _, runs = cli
    assert_one_error_line(runs["predict_big"][0], "big.npy", "expected floats in [0, 1]")


def test_predict_with_wrong_shape(cli):
    _, runs = cli
    assert_one_error_line(runs["predict_shape"][0], "shape.npy", "(2, 1, 9, 9)", "expected (N, 1, 8, 8)")


def test_train_with_bad_npz(cli):
    folder, runs = cli
    assert_one_error_line(runs["train_bad_npz"][0], "bad.npz", "x_train has shape (20, 8, 8)")
    assert not (folder / "bad_out.safetensors").exists()


def test_train_refuses_existing_output(cli):
    folder, runs = cli
    assert_one_error_line(runs["train_existing"][0], "taken.safetensors", "--force")
    assert (folder / "taken.safetensors").read_bytes() == b"precious bytes"


# ------------------------------------------------------------------------------------------------ happy path


def test_train_writes_a_model(cli):
    folder, runs = cli
    res, path = runs["happy"][0], folder / "out.safetensors"
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert "clean test accuracy" in res.stdout and path.name in res.stdout
    model, desc = load_model(path)
    assert desc["arch"] == "digits_cnn" and desc["num_classes"] == 10 and desc["input_shape"] == [1, 8, 8]
    assert desc["info"]["dataset"] == "digits"
    assert 0.5 <= desc["info"]["clean_accuracy"] <= 1.0  # two epochs already learn the digits (seen ~0.84)
    assert f"{desc['info']['clean_accuracy']:.3f}" in res.stdout


def test_predict_prints_one_label_per_input(cli, digits):
    folder, runs = cli
    assert runs["happy"][0].returncode == 0, runs["happy"][0].stderr
    out = runs["happy"][1]
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 25
    assert all(line.strip().isdigit() for line in lines)
    labels = [int(line) for line in lines]
    assert all(0 <= v < 10 for v in labels)
    model, _ = load_model(folder / "out.safetensors")
    x, y = digits.test.x[:25], digits.test.y[:25]
    assert labels == predict(model, x).tolist()
    assert np.mean(np.array(labels) == y.numpy()) >= 0.5


# ------------------------------- once-reported bugs, now fixed (in-process: same entry point, less time)


def _main(monkeypatch, capsys, *args) -> tuple[int, str]:
    from malex.cli import main

    monkeypatch.setattr(sys, "argv", ["malex", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        main()
    return info.value.code, capsys.readouterr().err


def _assert_in_process_error(code, err, *needles):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0]


def test_train_backdoor_target_out_of_range(tmp_path, monkeypatch, capsys):
    code, err = _main(monkeypatch, capsys, "train", tmp_path / "m.safetensors", "--trigger", "badnets",
                      "--target", 10, "--epochs", 1)
    _assert_in_process_error(code, err, "target")


def test_train_arch_too_big_for_images(tmp_path, monkeypatch, capsys):
    # was a RuntimeError traceback from conv2d inside build_model
    code, err = _main(monkeypatch, capsys, "train", tmp_path / "m.safetensors", "--arch", "mnist_cnn",
                      "--epochs", 1)
    _assert_in_process_error(code, err, "(1, 8, 8)")
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("folder", ["x[/y]", "[red]"])
def test_error_line_keeps_brackets_in_paths(tmp_path, monkeypatch, capsys, folder):
    missing = tmp_path / folder / "model.safetensors"
    code, err = _main(monkeypatch, capsys, "info", missing)
    _assert_in_process_error(code, err, str(missing))


def test_predict_npz_path_with_npy_content(tmp_path, monkeypatch, capsys, model_file):
    np.save(tmp_path / "a.npy", np.zeros((2, 1, 8, 8), np.float32))
    (tmp_path / "a.npz").write_bytes((tmp_path / "a.npy").read_bytes())
    code, err = _main(monkeypatch, capsys, "predict", model_file, tmp_path / "a.npz")
    if code == 2:  # refusing the file in one error line is fine
        _assert_in_process_error(code, err, "a.npz")
    else:  # and so is reading the one array it holds
        assert code in (0, None)


# ------------------------------------------- output paths checked before any work; OS errors in one line


def _no_work(monkeypatch):
    """Make the first piece of real work of every writing command fail loudly, so a refusal must come first."""
    import malex.data
    import malex.evaluate.demo
    import malex.evaluate.study
    import malex.evaluate.study.runner
    import malex.models

    def work(*args, **kwargs):
        raise AssertionError("work started before the output path was checked")

    for module, name in [(malex.models, "load_model"), (malex.data, "load_dataset"),
                         (malex.evaluate.demo, "load_digits"), (malex.evaluate.study, "Study"),
                         (malex.evaluate.study.runner, "open_study")]:
        monkeypatch.setattr(module, name, work)


def _writing_commands(tmp_path, target) -> dict[str, list]:
    (tmp_path / "config.toml").write_text("")
    return {
        "scan": ["scan", tmp_path / "guard.safetensors", tmp_path / "inputs.npy", "--model", tmp_path / "m",
                 "--output", target],
        "fit": ["fit", tmp_path / "m", "--out", target],
        "train": ["train", target, "--epochs", 1],
        "demo": ["demo", "--out", target],
        "study": ["study", tmp_path / "config.toml", "--out", target],
    }


@pytest.mark.parametrize("command", ["scan", "fit", "train", "demo", "study"])
def test_output_under_a_file_refused_before_any_work(tmp_path, monkeypatch, capsys, command):
    # was a traceback (NotADirectoryError) and only after all the work
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    _no_work(monkeypatch)
    code, err = _main(monkeypatch, capsys, *_writing_commands(tmp_path, tmp_path / "notes.txt" / "out")[command])
    _assert_in_process_error(code, err, "notes.txt", "is not a folder")


@pytest.mark.parametrize("command", ["scan", "fit", "train", "demo", "study", "report"])
def test_output_in_a_read_only_folder_refused_before_any_work(tmp_path, monkeypatch, capsys, command):
    import malex.atomic

    folder = tmp_path / "locked"
    folder.mkdir()
    real_access = os.access

    def access(p, mode):  # tests may run as root, where chmod cannot lock a folder
        return real_access(p, mode) and not (mode & os.W_OK and os.path.abspath(p) == str(folder))

    monkeypatch.setattr(malex.atomic.os, "access", access)
    _no_work(monkeypatch)
    args = ["report", folder] if command == "report" else _writing_commands(tmp_path, folder / "out")[command]
    code, err = _main(monkeypatch, capsys, *args)
    _assert_in_process_error(code, err, f"folder {folder} is not writable")


def test_scan_output_into_a_missing_folder_refused_before_screening(tmp_path, monkeypatch, capsys):
    # scan writes into an existing folder; a missing one was a FileNotFoundError traceback after screening
    _no_work(monkeypatch)
    target = tmp_path / "missing" / "rows.csv"
    code, err = _main(monkeypatch, capsys, *_writing_commands(tmp_path, target)["scan"])
    _assert_in_process_error(code, err, f"folder {target.parent} does not exist")


@pytest.mark.parametrize("command", ["scan", "fit", "train"])
def test_output_that_is_a_folder_refused_even_with_force(tmp_path, monkeypatch, capsys, command):
    (tmp_path / "already").mkdir()
    _no_work(monkeypatch)
    code, err = _main(monkeypatch, capsys, *_writing_commands(tmp_path, tmp_path / "already")[command], "--force")
    _assert_in_process_error(code, err, "already", "is a folder; expected a file")


def test_scan_refuses_existing_output_before_screening(tmp_path, monkeypatch, capsys):
    (tmp_path / "rows.csv").write_text("kept")
    _no_work(monkeypatch)
    code, err = _main(monkeypatch, capsys, *_writing_commands(tmp_path, tmp_path / "rows.csv")["scan"])
    _assert_in_process_error(code, err, "rows.csv exists", "--force")
    assert (tmp_path / "rows.csv").read_text() == "kept"


@pytest.mark.parametrize("exc", [PermissionError(13, "Permission denied", "/data/m.safetensors"),
                                 OSError(28, "No space left on device", "/data/m.safetensors")])
def test_os_errors_end_in_one_line(tmp_path, monkeypatch, capsys, exc):
    import malex.models.sources

    def fail(path):
        raise exc

    (tmp_path / "m.safetensors").write_bytes(b"x")
    monkeypatch.setattr(malex.models.sources, "source_kind", fail)
    code, err = _main(monkeypatch, capsys, "info", tmp_path / "m.safetensors")
    _assert_in_process_error(code, err, f"error: /data/m.safetensors: {exc.strerror}")


def test_genuine_bugs_keep_their_traceback(tmp_path, monkeypatch):
    import malex.models.sources
    from malex.cli import main

    def bug(path):
        raise RuntimeError("a bug")

    (tmp_path / "m.safetensors").write_bytes(b"x")
    monkeypatch.setattr(malex.models.sources, "source_kind", bug)
    monkeypatch.setattr(sys, "argv", ["malex", "info", str(tmp_path / "m.safetensors")])
    with pytest.raises(RuntimeError, match="a bug"):
        main()


# ------------------------------------------------------------------------------- demo never overwrites


@pytest.mark.parametrize("existing", ["model.safetensors", "results.json", "roc_curves.png", "lcr_histograms.png",
                                      "verdicts.png"])
def test_demo_refuses_a_folder_holding_its_files(tmp_path, monkeypatch, capsys, existing):
    # the demo overwrote model.safetensors and results.json, against "nothing is overwritten without --force"
    (tmp_path / existing).write_bytes(b"precious")
    (tmp_path / "unrelated.txt").write_text("not the demo's")
    _no_work(monkeypatch)
    code, err = _main(monkeypatch, capsys, "demo", "--out", tmp_path)
    _assert_in_process_error(code, err, str(tmp_path), existing, "--force")
    assert (tmp_path / existing).read_bytes() == b"precious"


def test_demo_with_force_goes_ahead_in_a_used_folder(tmp_path, monkeypatch):
    import malex.cli

    (tmp_path / "results.json").write_text("{}")
    _no_work(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["malex", "demo", "--out", str(tmp_path), "--force"])
    with pytest.raises(AssertionError, match="work started"):
        malex.cli.main()


def test_fit_takes_the_combination_rule_and_refuses_bad_ones(cli, model_file):
    from malex.guard import Guard
    from malex.models import load_model

    folder, runs = cli
    assert runs["fit_cauchy"][0].returncode == 0, runs["fit_cauchy"][0].stderr
    guard = Guard.load(folder / "cauchy.safetensors", load_model(model_file)[0])
    assert guard.config.combination == "cauchy"
    assert_one_error_line(runs["fit_bad_rule"][0], "'mean'")
    assert_one_error_line(runs["fit_bad_typing"][0], "--typing-settings is not valid JSON")
    assert not (folder / "mean.safetensors").exists() and not (folder / "typed.safetensors").exists()
