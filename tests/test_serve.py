"""The HTTP service, started for real on loopback and spoken to with httpx.

A digits model is trained briefly and a guard (Mahalanobis + mild mutation) fitted once for the module;
every server loads its own copy of both from files, as `malex serve` does.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from PIL import Image
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from malex.guard import Guard, GuardConfig
from malex.models import build_model, load_model, save_model
from malex.models.inference import predict
from malex.models.train import TrainConfig, train_classifier
from malex.serve import BackgroundServer, ServeConfig, create_app
from malex.serve.batcher import MicroBatcher
from malex.serve.errors import Overloaded

MAX_BATCH = 16


def npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(a), allow_pickle=True)
    return buf.getvalue()


def encode_image(a: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt)
    return buf.getvalue()


def as_uint8(x: torch.Tensor) -> np.ndarray:
    """(1, 8, 8) float images in [0, 1] as (8, 8) uint8 pictures."""
    return np.round(x.numpy()[0] * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def files(tmp_path_factory, digits):
    """A briefly trained digits model and a fitted guard, as files; and a reference guard in memory."""
    torch.manual_seed(0)
    model = build_model("digits_cnn", digits.image_shape, digits.num_classes)
    train_classifier(model, digits.train, TrainConfig(epochs=3, seed=0, shift=1), progress=False)
    folder = tmp_path_factory.mktemp("serve")
    model_path = save_model(model, folder / "model.safetensors", "digits_cnn")
    guard = Guard(model, GuardConfig(detectors=("mahalanobis", "mutation_adv"), progress=False,
                                     settings={"mutation_adv": {"max_mutants": 40}}))
    guard_path = guard.fit(digits.val.x, digits.val.y).save(folder / "guard.safetensors")
    reference = Guard.load(guard_path, load_model(model_path)[0])
    rng = np.random.default_rng(0)
    noise = torch.from_numpy(rng.random((6, 1, 8, 8), dtype=np.float32))
    return {"model": model_path, "guard": guard_path, "reference": reference, "clean": digits.test.x[:24],
            "noise": noise, "folder": folder}


def start(files, config: ServeConfig) -> BackgroundServer:
    """A server for its own copy of the model and guard (a guard serves one app at a time)."""
    net, description = load_model(files["model"])
    return BackgroundServer(create_app(Guard.load(files["guard"], net), config, description)).start()


@pytest.fixture(scope="module")
def server(files):
    srv = start(files, ServeConfig(max_batch=MAX_BATCH, max_wait_ms=2, max_body_bytes=64 * 1024))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def screen(client, body: bytes, content_type: str, **params) -> httpx.Response:
    return client.post("/v1/screen", content=body, headers={"content-type": content_type}, params=params)


def metric_samples(client) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} from /metrics."""
    text = client.get("/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# --------------------------------------------------------------------------------------------- happy paths

def test_health_info_and_openapi(client, files):
    assert client.get("/healthz").json() == {"status": "ok"}
    info = client.get("/v1/info").json()
    assert info["model"]["arch"] == "digits_cnn" and info["model"]["input_shape"] == [1, 8, 8]
    assert info["guard"]["detectors"] == ["mahalanobis", "mutation_adv"] and info["guard"]["fpr"] == 0.05
    assert 0 < info["guard"]["calibration_fpr"] <= 0.05
    assert info["serve"]["max_batch"] == MAX_BATCH and info["serve"]["protect"] is False
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/screen"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/x-npy", "application/octet-stream", "image/png", "image/jpeg",
                         "application/json"}
    responses = schema["paths"]["/v1/screen"]["post"]["responses"]
    for status in ("400", "413", "415", "422", "503"):
        assert responses[status]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert responses["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/ScreenResponse")
    components = schema["components"]["schemas"]
    assert {"JsonInputs", "ErrorResponse", "ScreenResult"} <= set(components)
    assert body["application/json"]["schema"]["$ref"].endswith("/JsonInputs")
    one_image = components["JsonInputs"]["anyOf"][0]["anyOf"][0]  # floats, (C, H, W): sizes fixed by the model
    assert (one_image["minItems"], one_image["items"]["minItems"], one_image["items"]["items"]["maxItems"]) == (1, 8, 8)
    assert {"/v1/screen", "/v1/predict", "/healthz", "/v1/info", "/metrics"} <= set(schema["paths"])


def test_screen_answers_as_guard_screen_does(client, files):
    x = torch.cat([files["clean"][:10], files["noise"]])
    res = screen(client, npy(x.numpy()), "application/x-npy")
    assert res.status_code == 200, res.text
    rows = res.json()["results"]
    ref = files["reference"].screen(x)
    assert [r["index"] for r in rows] == list(range(len(x)))
    assert [r["verdict"] for r in rows] == ref.verdict
    assert [r["prediction"] for r in rows] == ref.prediction.tolist()
    assert [r["flagged"] for r in rows] == ref.flagged.tolist()
    np.testing.assert_allclose([r["guard_score"] for r in rows], ref.guard_score, rtol=1e-4, atol=1e-5)
    for name in ("mahalanobis", "mutation_adv"):
        np.testing.assert_allclose([r["scores"][name] for r in rows], ref.scores[name], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose([r["pvalues"][name] for r in rows], ref.pvalues[name], rtol=1e-4, atol=1e-5)
    assert all(r["flagged"] for r in rows[10:]), "uniform noise should be flagged"
    assert not any(r["withheld"] for r in rows)


def test_png_jpeg_json_and_single_image_bodies(client, files):
    x = files["clean"][:3]
    pictures = [as_uint8(img) for img in x]
    expected = files["reference"].screen(torch.from_numpy(np.stack(pictures))[:, None].float() / 255)
    for i, picture in enumerate(pictures):
        got = screen(client, encode_image(picture, "PNG"), "image/png").json()["results"]
        assert len(got) == 1 and got[0]["verdict"] == expected.verdict[i]
        assert got[0]["prediction"] == int(expected.prediction[i])
        assert got[0]["guard_score"] == pytest.approx(float(expected.guard_score[i]), rel=1e-4, abs=1e-5)
    jpeg = encode_image(pictures[0], "JPEG")
    decoded = np.array(Image.open(io.BytesIO(jpeg)).convert("L"))
    got = screen(client, jpeg, "image/jpeg").json()["results"]
    assert got[0]["prediction"] == int(files["reference"].screen(decoded[None, None]).prediction[0])
    # an RGB picture is read as grey (luminance), as PIL converts it
    rgb = screen(client, encode_image(np.repeat(pictures[1][:, :, None], 3, axis=2), "PNG"), "image/png")
    assert rgb.json()["results"][0]["prediction"] == int(expected.prediction[1])
    # JSON: a bare nested float array, and an object with uint8 values
    as_json = screen(client, json.dumps(x.tolist()).encode(), "application/json").json()["results"]
    assert [r["prediction"] for r in as_json] == files["reference"].screen(x).prediction.tolist()
    as_uint = client.post("/v1/screen", json={"inputs": np.stack(pictures).tolist(), "dtype": "uint8"})
    assert [r["prediction"] for r in as_uint.json()["results"]] == expected.prediction.tolist()
    # one image as (C, H, W), (H, W) and (H, W, C): one result each, all the same
    one = x[0].numpy()
    answers = [screen(client, npy(a), "application/x-npy").json()["results"]
               for a in (one, one[0], one.transpose(1, 2, 0))]
    assert all(len(a) == 1 for a in answers)
    assert len({(a[0]["prediction"], a[0]["verdict"]) for a in answers}) == 1
    scores = [a[0]["guard_score"] for a in answers]
    assert scores == pytest.approx([scores[0]] * 3, rel=1e-4)


def test_predict_endpoint_gives_the_plain_model_predictions(client, files):
    x = files["clean"]
    res = client.post("/v1/predict", content=npy(x.numpy()[:MAX_BATCH]), headers={"content-type": "application/x-npy"})
    assert res.status_code == 200, res.text
    assert res.json()["predictions"] == predict(files["reference"].model, x[:MAX_BATCH]).tolist()


# ---------------------------------------------------------------------------------------------- bad inputs

def _bad_npy_bodies() -> dict[str, bytes]:
    good = npy(np.zeros((2, 1, 8, 8), np.float32))
    header_end = good.index(b"\n") + 1
    huge = good[:header_end].replace(b"(2, 1, 8, 8)", b"(999999999, 1, 8, 8)")
    return {
        "corrupt": b"\x93NUMPY\x01\x00garbage that is not a header",
        "not_npy": b"PK\x03\x04 a zip file perhaps",
        "truncated": good[:-100],
        "huge_shape": huge + good[header_end:],
        "pickled": npy(np.array([{"a": 1}, None], dtype=object)),
        "wrong_shape": npy(np.zeros((2, 1, 9, 9), np.float32)),
        "wrong_dtype": npy(np.zeros((2, 1, 8, 8), np.int64)),
        "complex": npy(np.zeros((2, 1, 8, 8), np.complex64)),
        "nan": npy(np.where(np.arange(128).reshape(2, 1, 8, 8) == 70, np.nan, 0.5).astype(np.float32)),
        "range": npy(np.full((2, 1, 8, 8), 3.0, np.float32)),
        "scalar": npy(np.float32(0.5)),
        "empty_batch": npy(np.zeros((0, 1, 8, 8), np.float32)),
        "too_many": npy(np.zeros((MAX_BATCH + 1, 1, 8, 8), np.float32)),
        "too_big": npy(np.zeros((300, 1, 8, 8), np.float32)),
    }


_NPY = _bad_npy_bodies()
_PNG = encode_image(np.zeros((8, 8), np.uint8), "PNG")
BAD = {  # name: (body, content type, status, code, words the message must hold)
    "npy_corrupt": (_NPY["corrupt"], "application/x-npy", 400, "corrupt_npy", "header"),
    "npy_not_npy": (_NPY["not_npy"], "application/octet-stream", 400, "corrupt_npy", "not an .npy"),
    "npy_truncated": (_NPY["truncated"], "application/x-npy", 400, "corrupt_npy", "truncated"),
    "npy_huge_shape": (_NPY["huge_shape"], "application/x-npy", 400, "corrupt_npy", "999999999"),
    "npy_pickled_objects": (_NPY["pickled"], "application/x-npy", 422, "invalid_dtype", "object"),
    "npy_wrong_shape": (_NPY["wrong_shape"], "application/x-npy", 422, "invalid_input", "expected (N, 1, 8, 8)"),
    "npy_wrong_dtype": (_NPY["wrong_dtype"], "application/x-npy", 422, "invalid_dtype", "int64"),
    "npy_complex": (_NPY["complex"], "application/x-npy", 422, "invalid_dtype", "complex"),
    "npy_nan": (_NPY["nan"], "application/x-npy", 422, "invalid_input", "NaN"),
    "npy_out_of_range": (_NPY["range"], "application/x-npy", 422, "invalid_input", "[0, 1]"),
    "npy_scalar": (_NPY["scalar"], "application/x-npy", 422, "invalid_shape", "shape ()"),
    "npy_empty_batch": (_NPY["empty_batch"], "application/x-npy", 422, "invalid_input", "no images"),
    "too_many_inputs": (_NPY["too_many"], "application/x-npy", 413, "batch_too_large", f"at most {MAX_BATCH}"),
    "body_too_large": (_NPY["too_big"], "application/x-npy", 413, "body_too_large", "65536"),
    "png_corrupt": (b"\x89PNG\r\n\x1a\n not really", "image/png", 400, "corrupt_image", "PNG"),
    "png_truncated": (_PNG[: len(_PNG) // 2], "image/png", 400, "corrupt_image", "PNG"),
    "png_is_jpeg": (encode_image(np.zeros((8, 8), np.uint8), "JPEG"), "image/png", 400, "corrupt_image", "PNG"),
    "png_wrong_size": (encode_image(np.zeros((9, 12), np.uint8), "PNG"), "image/png", 422, "invalid_shape", "12x9"),
    "png_16_bit": (encode_image(np.full((8, 8), 40000, np.uint16), "PNG"), "image/png", 422, "invalid_dtype", "8-bit"),
    "jpeg_corrupt": (b"\xff\xd8\xff\xe0 broken", "image/jpeg", 400, "corrupt_image", "JPEG"),
    "json_invalid": (b"[[1, 2", "application/json", 400, "invalid_json", "not valid JSON"),
    "json_not_utf8": (b"\xff\xfe[1]", "application/json", 400, "invalid_json", "not valid JSON"),
    "json_strings": (b'[["a", "b"]]', "application/json", 422, "invalid_dtype", "str"),
    "json_booleans": (b"[[true]]", "application/json", 422, "invalid_dtype", "bool"),
    "json_ragged": (b"[[0.5, 0.5], [0.5]]", "application/json", 422, "invalid_shape", "rectangular"),
    "json_too_deep": (b"[[[[[0.5]]]]]", "application/json", 422, "invalid_shape", "4 levels"),
    "json_very_deep": (b"[" * 100_000 + b"]" * 100_000, "application/json", 413, "body_too_large", "65536"),
    "json_recursion": (b"[" * 30_000 + b"]" * 30_000, "application/json", 413, "too_many_elements", "30000 arrays"),
    "json_nan": (json.dumps([[float("nan")] * 8] * 8).encode(), "application/json", 422, "invalid_input", "NaN"),
    "json_missing_inputs": (b'{"x": []}', "application/json", 422, "invalid_json", "'x'"),
    "json_bad_dtype": (b'{"inputs": [], "dtype": "int8"}', "application/json", 422, "invalid_dtype", "int8"),
    "json_uint8_range": (json.dumps({"inputs": [[300] * 8] * 8, "dtype": "uint8"}).encode(), "application/json",
                         422, "invalid_input", "0..255"),
    "json_object_body": (b'"just a string"', "application/json", 422, "invalid_shape", "str"),
    "empty_body": (b"", "application/x-npy", 400, "empty_body", "empty"),
    "text_plain": (b"0.5, 0.5", "text/plain", 415, "unsupported_media_type", "text/plain"),
    "no_content_type": (_NPY["wrong_shape"], "", 415, "unsupported_media_type", "(none)"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_answered_with_a_4xx_json_error(client, name):
    body, content_type, status, code, needle = BAD[name]
    headers = {"content-type": content_type} if content_type else {}
    res = client.post("/v1/screen", content=body, headers=headers)
    assert res.status_code == status, res.text
    assert res.headers["content-type"].startswith("application/json")
    err = res.json()
    assert err["status"] == status and err["code"] == code, err
    assert needle in err["message"], err["message"]


@pytest.mark.parametrize("method, path, params, status, code", [
    ("POST", "/v1/screen", {"protect": "maybe"}, 422, "invalid_parameter"),
    ("GET", "/v1/nowhere", {}, 404, "not_found"),
    ("DELETE", "/v1/screen", {}, 405, "method_not_allowed"),
    ("GET", "/v1/screen", {}, 405, "method_not_allowed"),
])
def test_bad_paths_methods_and_parameters_get_json_errors(client, method, path, params, status, code):
    res = client.request(method, path, params=params, json=[[0.5] * 8] * 8)
    assert res.status_code == status and res.json()["code"] == code, res.text


def test_service_keeps_serving_after_bad_inputs_and_never_answers_5xx(client, files):
    for body, content_type, *_ in BAD.values():  # every bad input again, then a good one
        client.post("/v1/screen", content=body, headers={"content-type": content_type} if content_type else {})
    res = screen(client, npy(files["clean"][:2].numpy()), "application/x-npy")
    assert res.status_code == 200 and len(res.json()["results"]) == 2
    statuses = {dict(labels).get("status") for (name, labels) in metric_samples(client)
                if name == "malex_requests_total"}
    assert statuses and not any(s.startswith("5") for s in statuses), statuses


# ---------------------------------------------------------------------------------------------- protect mode

def test_protect_mode_withholds_predictions_of_flagged_inputs(files, client):
    x = torch.cat([files["clean"][:6], files["noise"][:4]])
    ref = files["reference"].screen(x)
    assert ref.flagged.any() and not ref.flagged.all()
    plain_model = predict(files["reference"].model, x).tolist()

    def check(rows, withheld: bool):
        for row, flagged, label in zip(rows, ref.flagged, plain_model, strict=True):
            assert row["flagged"] == bool(flagged)
            if withheld and flagged:
                assert row["prediction"] is None and row["withheld"] is True
            else:
                assert row["prediction"] == label and row["withheld"] is False

    # per request, on a server without protection
    check(screen(client, npy(x.numpy()), "application/x-npy").json()["results"], withheld=False)
    asked = screen(client, npy(x.numpy()), "application/x-npy", protect="true").json()
    assert asked["protect"] is True
    check(asked["results"], withheld=True)
    # server-wide: a request cannot turn it off, and the unscreened /v1/predict is not served
    srv = start(files, ServeConfig(protect=True, max_batch=MAX_BATCH, max_wait_ms=2))
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            for params in ({}, {"protect": "false"}):
                got = screen(c, npy(x.numpy()), "application/x-npy", **params).json()
                assert got["protect"] is True
                check(got["results"], withheld=True)
            assert c.get("/v1/info").json()["serve"]["protect"] is True
            assert c.post("/v1/predict", content=npy(x.numpy()), headers={"content-type": "application/x-npy"}
                          ).status_code == 404
            withheld = metric_samples(c)[("malex_predictions_withheld_total", ())]
            assert withheld == 2 * int(ref.flagged.sum())
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------------------- batching

def test_concurrent_requests_share_one_forward_pass(files):
    """With a long wait, a batch closes only when full: 8 inputs in 5 concurrent requests -> one pass."""
    srv = start(files, ServeConfig(max_batch=8, max_wait_ms=30_000))
    sizes = [1, 1, 2, 3, 1]
    parts = torch.split(files["clean"][:8], sizes)

    async def send_all():
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
            return await asyncio.gather(*[c.post("/v1/screen", content=npy(p.numpy()),
                                                 headers={"content-type": "application/x-npy"}) for p in parts])
    try:
        answers = asyncio.run(send_all())
        with httpx.Client(base_url=srv.url) as c:
            samples = metric_samples(c)
        batcher = srv.app.state.batchers["screen"]
    finally:
        srv.stop()
    assert batcher.forward_passes == 1
    assert samples[("malex_forward_passes_total", (("batcher", "screen"),))] == 1
    assert samples[("malex_batch_requests_sum", (("batcher", "screen"),))] == len(sizes)
    assert samples[("malex_batch_inputs_sum", (("batcher", "screen"),))] == 8
    for part, answer in zip(parts, answers, strict=True):
        assert answer.status_code == 200, answer.text
        ref = files["reference"].screen(part)
        assert [r["verdict"] for r in answer.json()["results"]] == ref.verdict
        assert [r["prediction"] for r in answer.json()["results"]] == ref.prediction.tolist()


def test_batcher_never_exceeds_max_batch_and_splits_results_back():
    from concurrent.futures import ThreadPoolExecutor

    seen = []

    def run(x):
        seen.append(int(x.shape[0]))
        return x.flatten(1).sum(1)

    async def main():
        batcher = MicroBatcher(run, lambda r, a, b: r[a:b], max_batch=4, max_wait_ms=20, max_queue=16)
        with ThreadPoolExecutor(1) as pool:
            await batcher.start(pool)
            xs = [torch.full((n, 1, 2, 2), float(i)) for i, n in enumerate([3, 3, 2, 1, 4])]
            out = await asyncio.gather(*[batcher.submit(x) for x in xs])
            await batcher.stop()
        return xs, out, batcher.forward_passes

    xs, out, passes = asyncio.run(main())
    for x, o in zip(xs, out, strict=True):
        torch.testing.assert_close(o, x.flatten(1).sum(1))
    assert max(seen) <= 4 and sum(seen) == 13 and passes == len(seen) < 5


def test_batcher_refuses_inputs_beyond_its_queue():
    from concurrent.futures import ThreadPoolExecutor

    started, release = threading.Event(), threading.Event()

    def run(x):
        started.set()
        release.wait(10)
        return x

    async def main():
        batcher = MicroBatcher(run, lambda r, a, b: r[a:b], max_batch=2, max_wait_ms=0, max_queue=2)
        with ThreadPoolExecutor(1) as pool:
            await batcher.start(pool)
            busy = asyncio.ensure_future(batcher.submit(torch.zeros(2, 1, 2, 2)))
            while not started.is_set():  # the first batch leaves the queue for the (blocked) worker
                await asyncio.sleep(0.001)
            assert batcher.pending == 0
            waiting = asyncio.ensure_future(batcher.submit(torch.zeros(2, 1, 2, 2)))
            await asyncio.sleep(0)
            with pytest.raises(Overloaded):
                await batcher.submit(torch.zeros(1, 1, 2, 2))
            release.set()
            done = await asyncio.gather(busy, waiting)
            await batcher.stop()
        return done

    assert [len(d) for d in asyncio.run(main())] == [2, 2]


# -------------------------------------------------------------------------------------------------- metrics

def test_metrics_count_requests_latency_and_verdicts_per_app(client, files):
    before = metric_samples(client)
    x = torch.cat([files["clean"][:4], files["noise"][:3]])
    verdicts = files["reference"].screen(x).verdict
    assert screen(client, npy(x.numpy()), "application/x-npy").status_code == 200
    after = metric_samples(client)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    for verdict in ("benign", "adversarial", "backdoor"):
        assert delta("malex_verdicts_total", verdict=verdict) == verdicts.count(verdict)
    assert delta("malex_requests_total", endpoint="/v1/screen", method="POST", status="200") == 1
    assert delta("malex_request_latency_seconds_count", endpoint="/v1/screen") == 1
    assert delta("malex_inputs_total", endpoint="/v1/screen") == 7
    # each app has its own registry; nothing lands in prometheus_client's global one
    assert not [m for m in REGISTRY.collect() if m.name.startswith("malex_")]


# ------------------------------------------------------------------------------------------------------ CLI

def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(client: "httpx.Client", proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """Poll /healthz until the service in `proc` answers 200; fail with its stderr if it exits first."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if client.get("/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the service did not start"
        time.sleep(0.1)


def test_cli_serve_starts_a_protected_service(files):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "malex.cli", "serve", str(files["guard"]), "--model",
                             str(files["model"]), "--port", str(port), "--protect", "--max-batch", "4",
                             "--log-level", "warning"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            wait_until_serving(c, proc)
            info = c.get("/v1/info").json()
            assert info["serve"] == {**info["serve"], "protect": True, "predict_endpoint": False, "max_batch": 4}
            res = screen(c, npy(files["noise"][:2].numpy()), "application/x-npy").json()["results"]
            assert [r["prediction"] for r in res] == [None, None]
            assert screen(c, npy(files["noise"][:5].numpy()), "application/x-npy").status_code == 413
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _serve_main(monkeypatch, capsys, *args) -> tuple[int, list[str]]:
    from malex.cli import main

    monkeypatch.setattr(sys, "argv", ["malex", "serve", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        main()
    return info.value.code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_cli_serve_refuses_a_guard_for_another_model(files, tmp_path, monkeypatch, capsys):
    torch.manual_seed(1)
    other = save_model(build_model("digits_cnn", (1, 8, 8), 10), tmp_path / "other.safetensors", "digits_cnn")
    code, lines = _serve_main(monkeypatch, capsys, files["guard"], "--model", other)
    assert code == 2 and len(lines) == 1 and "different model" in lines[0]


def test_cli_serve_refuses_a_port_in_use_and_bad_limits(files, monkeypatch, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, lines = _serve_main(monkeypatch, capsys, files["guard"], "--model", files["model"], "--port", port)
    assert code == 2 and len(lines) == 1 and "cannot listen" in lines[0] and str(port) in lines[0]
    code, lines = _serve_main(monkeypatch, capsys, files["guard"], "--model", files["model"], "--max-batch", 0)
    assert code == 2 and len(lines) == 1 and "max_batch" in lines[0]


def test_connections_of_the_listening_socket_have_nagle_off():
    """Keep-alive answers must not wait for a delayed ACK (Nagle): asyncio sets TCP_NODELAY on the
    connections only when the listening socket says it is TCP."""
    from malex.serve.server import _bind

    seen: list[int] = []

    async def main() -> None:
        def handle(reader, writer) -> None:
            seen.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(handle, sock=_bind("127.0.0.1", 0))
        port = server.sockets[0].getsockname()[1]
        async with server:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(100):
                if seen:
                    break
                await asyncio.sleep(0.01)
            writer.close()

    asyncio.run(main())
    assert seen and seen[0] != 0
