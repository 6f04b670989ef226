"""Scans of large sources (malex.scan): the parts of a folder of shards and images hold every input exactly once
with the scores Guard.screen gives; a scan interrupted part-way resumes without losing or repeating rows; a folder
holding another scan is refused; on Ray (when installed) the rows and scores are those of the local scan."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from malex.errors import ConfigError, DataFileError, InputError
from malex.guard import Guard, GuardConfig
from malex.guard.spec import GuardSpec
from malex.models import ModelSpec, save_model
from malex.scan import ScanSettings, scan_to_folder
from malex.scan.folder import ATTEMPTS

pq = pytest.importorskip("pyarrow.parquet", reason="scan folders are written as Parquet; pyarrow is not installed")
DETECTORS = ("mahalanobis", "mutation_adv")
SCORES = ("guard_score",) + DETECTORS


@pytest.fixture(scope="module")
def scanned(poisoned_digits, tmp_path_factory):
    """A saved model and guard, and a source folder of an .npy shard, an .npz shard and three PNG images, with
    the inputs in source order."""
    from PIL import Image

    root = tmp_path_factory.mktemp("scan")
    model, data = poisoned_digits["model"], poisoned_digits["data"]
    guard = Guard(model, GuardConfig(detectors=DETECTORS, progress=False)).fit(data.val.x, data.val.y)
    model_file = save_model(model, root / "model.safetensors", "digits_cnn")
    guard_file = guard.save(root / "guard.safetensors")
    x = (data.test.x[:, 0].numpy() * 255).round().astype(np.uint8)  # (N, 8, 8) grey, as the files hold them
    source = root / "source"
    (source / "images").mkdir(parents=True)
    np.save(source / "a.npy", x[:130])
    np.savez(source / "b.npz", x=x[130:200])
    for i in range(3):
        Image.fromarray(x[200 + i]).save(source / "images" / f"{i}.png")
    inputs = torch.from_numpy(x[:203]).float().div(255).unsqueeze(1)
    keys = [(str(source / "a.npy"), i) for i in range(130)] + [(str(source / "b.npz"), i) for i in range(70)] + \
        [(str(source / "images" / f"{i}.png"), 0) for i in range(3)]
    return {"guard": guard, "spec": GuardSpec(guard_file, ModelSpec(model_file)), "source": source,
            "inputs": inputs, "keys": keys}


def _rows(folder) -> dict:
    table = pq.read_table(folder).to_pydict()  # pyarrow skips _scan.json and .attempts
    return table


def _check_rows(table: dict, scanned) -> None:
    keys = list(zip(table["source"], table["index"]))
    assert len(keys) == len(set(keys)) == len(scanned["keys"])  # every input once
    order = {k: i for i, k in enumerate(keys)}
    at = np.array([order[k] for k in scanned["keys"]])
    expected = scanned["guard"].screen(scanned["inputs"])
    np.testing.assert_array_equal(np.asarray(table["prediction"])[at], expected.prediction)
    assert [table["verdict"][i] for i in at] == expected.verdict
    for name in SCORES:
        want = expected.guard_score if name == "guard_score" else expected.scores[name]
        # float32 activations of a batch of 3 and of 203 differ in the last bits; nothing more may differ
        np.testing.assert_allclose(np.asarray(table[name])[at], want, rtol=1e-5, atol=1e-6)


def test_scan_writes_every_input_once_with_the_scores_of_guard_screen(scanned, tmp_path):
    report = scan_to_folder(str(scanned["source"]), scanned["spec"], tmp_path / "out",
                            ScanSettings(part_size=50, progress=False))
    assert (report.parts, report.inputs, report.skipped_parts, report.computed_inputs) == (6, 203, 0, 203)
    assert sorted(p.name for p in (tmp_path / "out").glob("part-*.parquet")) == sorted(d.name + ".parquet"
                                                                                     for d in report.computed)
    table = _rows(tmp_path / "out")
    _check_rows(table, scanned)
    assert list(table["source"]) == [k for k, _ in scanned["keys"]]  # parts in name order are in source order
    assert report.flagged == sum(v != "benign" for v in table["verdict"]) and not report.retried
    assert not (tmp_path / "out" / ATTEMPTS).exists()


def test_a_glob_of_shards_and_json_lines(scanned, tmp_path):
    report = scan_to_folder(str(scanned["source"] / "*.np[yz]"), scanned["spec"], tmp_path / "out",
                            ScanSettings(fmt="jsonl", part_size=64, progress=False))
    rows = [json.loads(line) for f in sorted((tmp_path / "out").glob("part-*.jsonl")) for line in f.open()]
    assert report.inputs == len(rows) == 200 and [r["index"] for r in rows[:3]] == [0, 1, 2]
    assert set(rows[0]) == {"source", "index", "prediction", "verdict", *SCORES}


def test_an_interrupted_scan_resumes_without_losing_or_repeating_rows(scanned, tmp_path, monkeypatch):
    import malex.scan.screen

    real, calls = malex.scan.screen.screen_columns, []

    def dies_on_the_third_part(guard, part, resize=False):
        calls.append(part.name)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process is stopped half-way through a part
        return real(guard, part, resize)

    monkeypatch.setattr(malex.scan.screen, "screen_columns", dies_on_the_third_part)
    settings = ScanSettings(part_size=50, progress=False)
    with pytest.raises(KeyboardInterrupt):
        scan_to_folder(str(scanned["source"]), scanned["spec"], tmp_path / "out", settings)
    assert len(list((tmp_path / "out").glob("part-*"))) == 2
    monkeypatch.setattr(malex.scan.screen, "screen_columns", real)
    report = scan_to_folder(str(scanned["source"]), scanned["spec"], tmp_path / "out", settings)
    assert (report.skipped_parts, len(report.computed), report.computed_inputs) == (2, 4, 103)
    assert list(report.retried) == [calls[2]] and len(report.retried[calls[2]]) == 2  # begun twice, said so
    _check_rows(_rows(tmp_path / "out"), scanned)
    again = scan_to_folder(str(scanned["source"]), scanned["spec"], tmp_path / "out", settings)
    assert (again.skipped_parts, again.computed) == (6, [])  # a finished scan rerun does nothing


def test_a_folder_holding_another_scan_is_refused_unless_forced(scanned, tmp_path):
    out = tmp_path / "out"
    scan_to_folder(str(scanned["source"] / "a.npy"), scanned["spec"], out, ScanSettings(part_size=50, progress=False))
    with pytest.raises(ConfigError, match="holds a scan of other inputs.*--force"):
        scan_to_folder(str(scanned["source"] / "a.npy"), scanned["spec"], out,
                       ScanSettings(part_size=40, progress=False))
    report = scan_to_folder(str(scanned["source"] / "a.npy"), scanned["spec"], out,
                            ScanSettings(part_size=40, progress=False, force=True))
    assert report.skipped_parts == 0 and len(list(out.glob("part-*"))) == report.parts == 4


def test_bad_sources_are_one_line_errors(scanned, tmp_path):
    settings = ScanSettings(progress=False)
    for source, needle in [(tmp_path / "none", "no such file or folder"), (str(tmp_path / "*.npy"), "holds no")]:
        with pytest.raises(DataFileError, match=needle):
            scan_to_folder(str(source), scanned["spec"], tmp_path / "out", settings)
    np.save(tmp_path / "wrong.npy", np.zeros((4, 9, 9), dtype=np.uint8))
    with pytest.raises(Exception, match="expected \\(N, 1, 8, 8\\)"):
        scan_to_folder(str(tmp_path / "wrong.npy"), scanned["spec"], tmp_path / "out", settings)


def test_images_of_another_size_are_refused_or_resized(scanned, tmp_path):
    from PIL import Image

    (tmp_path / "big").mkdir()
    Image.fromarray(np.full((16, 12), 200, dtype=np.uint8)).save(tmp_path / "big" / "a.png")
    with pytest.raises(InputError, match="16x12 pixels.*expected 8x8"):
        scan_to_folder(str(tmp_path / "big"), scanned["spec"], tmp_path / "out", ScanSettings(progress=False))
    report = scan_to_folder(str(tmp_path / "big"), scanned["spec"], tmp_path / "out",
                            ScanSettings(progress=False, resize=True, force=True))
    assert report.computed_inputs == 1 and _rows(tmp_path / "out")["source"] == [str(tmp_path / "big" / "a.png")]


def test_cli_scan_out_dir_and_ray_without_ray(scanned, tmp_path, monkeypatch, capsys):
    from malex.cli import main

    spec = scanned["spec"]
    base = ["malex", "scan", str(spec.guard_file), str(scanned["source"]), "--model", str(spec.model.path)]
    monkeypatch.setattr(sys, "argv", base + ["--out-dir", str(tmp_path / "out"), "--part-size", "100", "--quiet"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 0
    assert "203 inputs in 4 parts: 203 screened now" in " ".join(capsys.readouterr().err.split())
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    monkeypatch.setattr(sys, "argv", base + ["--out-dir", str(tmp_path / "ray"), "--ray", "--quiet"])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and "\n" not in err and "pip install 'malex[ray]'" in err, err


def test_scan_on_ray_gives_the_rows_and_scores_of_the_local_scan(scanned, tmp_path, ray_local):
    local = scan_to_folder(str(scanned["source"]), scanned["spec"], tmp_path / "local",
                           ScanSettings(part_size=50, progress=False))
    report = scan_to_folder(str(scanned["source"]), scanned["spec"], tmp_path / "ray",
                            ScanSettings(part_size=50, progress=False, ray="local", actors=2))
    assert ray_local.is_initialized()  # the scan used the running instance and left it running
    assert sorted(d.name for d in report.computed) == sorted(d.name for d in local.computed)
    assert all(d.worker != local.computed[0].worker for d in report.computed)  # screened by the actors
    on_ray, here = _rows(tmp_path / "ray"), _rows(tmp_path / "local")
    assert on_ray["source"] == here["source"] and on_ray["index"] == here["index"]
    assert on_ray["prediction"] == here["prediction"] and on_ray["verdict"] == here["verdict"]
    for name in SCORES:  # the same parts, screened the same way in another process: the same numbers
        np.testing.assert_array_equal(on_ray[name], here[name])
    _check_rows(on_ray, scanned)


def test_parquet_sources_of_encoded_images_and_of_numbers(scanned, tmp_path):
    import io

    import pyarrow as pa
    from PIL import Image

    x = (scanned["inputs"][:, 0].numpy() * 255).round().astype(np.uint8)[:20]

    def png(a):
        buffer = io.BytesIO()
        Image.fromarray(a).save(buffer, format="PNG")
        return buffer.getvalue()

    source = tmp_path / "source"
    source.mkdir()
    pq.write_table(pa.table({"image": [{"bytes": png(a), "path": f"{i}.png"} for i, a in enumerate(x)]}),
                   source / "hf.parquet", row_group_size=6)  # Hugging Face datasets' layout
    pq.write_table(pa.table({"id": list(range(20)), "x": [a.reshape(-1).tolist() for a in x]}),
                   source / "flat.parquet", row_group_size=7)  # Python ints: int64 pixels in 0..255
    pq.write_table(pa.table({"image": [a.tolist() for a in x / 255.0]}), source / "nested.parquet")  # (H, W) floats
    report = scan_to_folder(str(source), scanned["spec"], tmp_path / "out", ScanSettings(part_size=8, progress=False))
    table = _rows(tmp_path / "out")
    assert table["source"][::20] == [str(source / f) for f in ("flat.parquet", "hf.parquet", "nested.parquet")]
    assert report.inputs == 60 and report.parts == 9
    expected = scanned["guard"].screen(scanned["inputs"][:20])
    for half in (slice(0, 20), slice(20, 40), slice(40, 60)):  # flat, hf, nested (sorted names)
        assert table["index"][half] == list(range(20))
        np.testing.assert_array_equal(table["prediction"][half], expected.prediction)
        np.testing.assert_allclose(table["guard_score"][half], expected.guard_score, rtol=1e-5, atol=1e-6)
    pq.write_table(pa.table({"x": [[300] * 64]}), source / "flat.parquet")
    with pytest.raises(InputError, match="integer pixels span 300..300; expected 0..255"):
        scan_to_folder(str(source), scanned["spec"], tmp_path / "out2", ScanSettings(progress=False))
