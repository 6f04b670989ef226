"""The HTTP service against hostile clients: cheap refusals, client aborts, odd dtypes, malformed HTTP,
API keys, Host allow-list, timeouts, connection cap, docs off, graceful shutdown (issue 16).

Servers run on a free loopback port with an untrained digits model guarded by Mahalanobis alone (quick to
fit); nothing here asserts a speed, only what was answered and how much work was done.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
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
from prometheus_client.parser import text_string_to_metric_families

from malex.errors import ConfigError
from malex.guard import Guard, GuardConfig
from malex.models import build_model, load_model, save_model
from malex.serve import BackgroundServer, ServeConfig, create_app
from malex.serve import decode
from test_serve import free_port, wait_until_serving
from malex.serve.limits import body_limits, json_element_limits

SHAPE = (1, 8, 8)
KEY = "test-key-0123456789abcdef"


def npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(a))
    return buf.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory, digits):
    torch.manual_seed(0)
    model = build_model("digits_cnn", SHAPE, 10)
    folder = tmp_path_factory.mktemp("serve_hardening")
    model_path = save_model(model, folder / "model.safetensors", "digits_cnn")
    guard = Guard(model, GuardConfig(detectors=("mahalanobis",), progress=False))
    guard_path = guard.fit(digits.val.x, digits.val.y).save(folder / "guard.safetensors")
    return {"model": model_path, "guard": guard_path, "x": digits.test.x[:8], "folder": folder}


def serve(files, **settings) -> BackgroundServer:
    """A server (not yet started: `with serve(...) as srv`) for its own copy of the model and guard."""
    net, description = load_model(files["model"])
    return BackgroundServer(create_app(Guard.load(files["guard"], net), ServeConfig(**settings), description))


@pytest.fixture(scope="module")
def server(files):
    with serve(files, max_batch=4, max_wait_ms=1, request_read_s=1.0, max_connections=8) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def statuses(client) -> dict[str, float]:
    """{status: count} of malex_requests_total over every endpoint."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if s.name == "malex_requests_total":
                out[s.labels["status"]] = out.get(s.labels["status"], 0.0) + s.value
    return out


def raw(server: BackgroundServer, data: bytes, wait: float = 10.0) -> bytes:
    """Send raw bytes on a new connection and read until the server closes it (or `wait` s pass)."""
    with socket.create_connection((server.host, server.port), timeout=wait) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except socket.timeout:
            pass
    return b"".join(chunks)


def parse(response: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one raw HTTP/1.1 response."""
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict((k.strip().lower(), v.strip()) for k, v in (line.split(":", 1) for line in lines[1:]))
    return int(lines[0].split()[1]), headers, body


def assert_json_error(status: int, headers: dict, body: bytes, expected: int, code: str) -> dict:
    assert status == expected, body
    assert headers["content-type"].startswith("application/json"), headers
    err = json.loads(body)
    assert err["status"] == expected and err["code"] == code and err["message"], err
    return err


# ------------------------------------------------------------------------------------- 1: cheap JSON refusal

def test_many_empty_lists_are_refused_by_structure_before_parsing(files, monkeypatch):
    """`[[],[],...]` is refused from a count of its brackets; json.loads is never called on it."""
    calls: list[int] = []
    real = json.loads

    def spy(body, **kw):  # json is one module: note only the calls on bodies this large
        if len(body) >= 100_000:
            calls.append(len(body))
        return real(body, **kw)

    monkeypatch.setattr(decode.json, "loads", spy)
    body = b"[" + b",".join([b"[]"] * 300_000) + b"]"
    with serve(files, max_batch=4, max_body_bytes=4 * 1024 * 1024) as srv, httpx.Client(base_url=srv.url) as c:
        res = c.post("/v1/screen", content=body, headers={"content-type": "application/json"})
        assert res.status_code == 413 and res.json()["code"] == "too_many_elements", res.text
        assert "300001 arrays" in res.json()["message"] and "at most" in res.json()["message"]
        many_numbers = b"[" + b",".join([b"0"] * 100_000) + b"]"
        res = c.post("/v1/screen", content=many_numbers, headers={"content-type": "application/json"})
        assert res.status_code == 413 and res.json()["code"] == "too_many_elements", res.text
        assert c.get("/healthz").status_code == 200
    assert calls == []
    ok = json.dumps([files["x"][0].tolist()] * 4, indent=4).encode()  # a full batch, pretty-printed, still parses
    assert decode.read_json(ok, SHAPE, 4).shape == (4, 1, 8, 8)


def test_default_body_limits_follow_the_models_shape_and_max_batch(client, files):
    limits = body_limits(SHAPE, 4, None)
    numbers, arrays = json_element_limits(SHAPE, 4)
    assert numbers == 4 * 64 and arrays == 1 + 4 * (1 + max(1 + 8, 8 + 64))
    info = client.get("/v1/info").json()["serve"]
    assert info["body_limits"] == limits and info["max_body_bytes"] == max(limits.values())
    full = npy(np.full((4, 1, 8, 8), 0.5, np.float64))  # the largest valid .npy: max_batch float64 inputs
    assert len(full) <= limits["application/x-npy"] < 8 * 1024 * 1024
    assert client.post("/v1/screen", content=full, headers={"content-type": "application/x-npy"}).status_code == 200
    pretty = json.dumps({"inputs": np.full((4, 1, 8, 8), 1 / 3).tolist(), "dtype": "float32"}, indent=2).encode()
    assert len(pretty) <= limits["application/json"]
    assert client.post("/v1/screen", content=pretty, headers={"content-type": "application/json"}).status_code == 200
    over = full + b"\0" * (limits["application/x-npy"] - len(full) + 1)
    res = client.post("/v1/screen", content=over, headers={"content-type": "application/x-npy"})
    assert res.status_code == 413 and res.json()["code"] == "body_too_large"
    assert str(limits["application/x-npy"]) in res.json()["message"]
    assert body_limits(SHAPE, 4, 5000) == dict.fromkeys(limits, 5000)  # an explicit limit for every type


# ----------------------------------------------------------------------------------------- 2: client abort

def test_a_client_that_disconnects_mid_upload_is_a_client_abort(server, client):
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    loggers = [logging.getLogger(n) for n in ("malex.serve", "uvicorn.error", "uvicorn")]
    for lg in loggers:
        lg.addHandler(handler)
    before = statuses(client)
    try:
        with socket.create_connection((server.host, server.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/screen HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/x-npy\r\n"
                         b"content-length: 5000\r\n\r\n" + b"\x93NUMPY" + b"\0" * 500)
            time.sleep(0.2)  # let the service start reading the body
        for _ in range(200):
            after = statuses(client)
            if after.get("499", 0) > before.get("499", 0):
                break
            time.sleep(0.05)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    assert after.get("499", 0) == before.get("499", 0) + 1, after
    assert after.get("500", 0) == before.get("500", 0)
    mine = [r for r in records if "closed the connection" in r.getMessage()]
    assert len(mine) == 1 and mine[0].exc_info is None and "\n" not in mine[0].getMessage(), records
    assert not [r for r in records if r.exc_info], [r.getMessage() for r in records]


# ------------------------------------------------------------------------------------- 3: float128 and co

@pytest.mark.parametrize("dtype", [np.longdouble, np.complex64, np.clongdouble, np.bool_, np.int16, "<U2"])
def test_unsupported_npy_dtypes_are_refused_naming_the_accepted_ones(client, dtype):
    body = npy(np.zeros((2, 1, 8, 8), dtype))
    res = client.post("/v1/screen", content=body, headers={"content-type": "application/x-npy"})
    err = assert_json_error(res.status_code, res.headers, res.content, 422, "invalid_dtype")
    assert str(np.dtype(dtype)) in err["message"]
    assert all(name in err["message"] for name in ("uint8", "float16", "float32", "float64")), err
    assert client.get("/healthz").status_code == 200


# ---------------------------------------------------------------------------------------- 9: malformed HTTP

@pytest.mark.parametrize("request_bytes", [
    b"NOT AN HTTP REQUEST\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nno colon here\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-length: -4\r\n\r\n",
])
def test_malformed_request_lines_and_headers_get_a_json_400(server, request_bytes):
    status, headers, body = parse(raw(server, request_bytes))
    err = assert_json_error(status, headers, body, 400, "bad_request")
    assert "expected" in err["message"]


# ---------------------------------------------------------------------------------------- authentication

def test_an_api_key_guards_every_endpoint_but_the_open_ones(files):
    x = npy(files["x"][:1].numpy())
    with serve(files, api_key=KEY, open_endpoints=("/healthz",)) as srv, httpx.Client(base_url=srv.url) as c:
        headers = {"content-type": "application/x-npy"}
        for extra in ({}, {"authorization": "Bearer wrong"}, {"x-api-key": KEY[:-1]}, {"authorization": KEY}):
            res = c.post("/v1/screen", content=x, headers={**headers, **extra})
            assert_json_error(res.status_code, res.headers, res.content, 401, "unauthorized")
            assert res.headers["www-authenticate"] == "Bearer"
        for extra in ({"authorization": f"Bearer {KEY}"}, {"x-api-key": KEY}):
            assert c.post("/v1/screen", content=x, headers={**headers, **extra}).status_code == 200
        assert c.get("/healthz").status_code == 200
        for path in ("/metrics", "/v1/info", "/openapi.json"):
            assert c.get(path).status_code == 401
            assert c.get(path, headers={"x-api-key": KEY}).status_code == 200
    with serve(files, api_key=KEY, open_endpoints=("/healthz", "/metrics")) as srv, httpx.Client(base_url=srv.url) as c:
        assert c.get("/metrics").status_code == 200 and c.get("/v1/info").status_code == 401


def test_a_non_loopback_bind_needs_a_key_unless_waived(tmp_path):
    with pytest.raises(ConfigError, match="api-key-file"):
        ServeConfig(host="0.0.0.0")
    assert ServeConfig(host="0.0.0.0", api_key=KEY).api_key == KEY
    assert ServeConfig(host="0.0.0.0", allow_unauthenticated=True).api_key is None
    assert ServeConfig(host="::1").host == "::1" and ServeConfig(host="localhost").api_key is None
    assert KEY not in repr(ServeConfig(api_key=KEY))
    with pytest.raises(ConfigError, match="at least 16"):
        ServeConfig(api_key="short")
    with pytest.raises(ConfigError, match="open_endpoints"):
        ServeConfig(open_endpoints=("/v1/screen",))
    from malex.serve.access import read_api_key

    (tmp_path / "key").write_text(KEY + "\n")
    assert read_api_key(tmp_path / "key") == KEY
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        read_api_key(tmp_path / "empty")
    with pytest.raises(ConfigError, match="cannot read"):
        read_api_key(tmp_path / "missing")


# ---------------------------------------------------------------------------------------- host allow-list

def test_requests_for_another_host_are_refused(server, client):
    for host in ("evil.example", "evil.example:80", "127.0.0.2"):
        res = client.get("/healthz", headers={"host": host})
        err = assert_json_error(res.status_code, res.headers, res.content, 400, "invalid_host")
        assert "127.0.0.1" in err["message"]
    for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}", "LOCALHOST", f"[::1]:{server.port}"):
        assert client.get("/healthz", headers={"host": host}).status_code == 200, host
    status, headers, body = parse(raw(server, b"GET /healthz HTTP/1.0\r\n\r\n"))
    assert_json_error(status, headers, body, 400, "invalid_host")
    config = ServeConfig(host="0.0.0.0", api_key=KEY, allowed_hosts=("guard.example.org",))
    assert "guard.example.org" in config.allowed_hosts and "localhost" in config.allowed_hosts
    assert ServeConfig(allowed_hosts=("*",)).allowed_hosts == ("*",)


# ----------------------------------------------------------------------------------- timeouts and limits

def test_idle_and_slow_clients_are_dropped_after_the_read_timeout(server):
    assert raw(server, b"") == b""  # connected, sent nothing: closed by the server
    assert raw(server, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n") == b""  # headers never finished
    status, headers, body = parse(raw(server, b"POST /v1/screen HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: "
                                              b"application/x-npy\r\ncontent-length: 900\r\n\r\n\x93NUMPY"))
    assert_json_error(status, headers, body, 408, "request_timeout")


def test_connections_beyond_the_cap_get_a_json_503(files):
    with serve(files, max_connections=2, request_read_s=30) as srv:
        idle = [socket.create_connection((srv.host, srv.port), timeout=10) for _ in range(2)]
        try:
            time.sleep(0.2)
            status, headers, body = parse(raw(srv, b""))
            assert_json_error(status, headers, body, 503, "too_many_connections")
        finally:
            for sock in idle:
                sock.close()
        for _ in range(100):  # once the idle ones are gone, new clients are served
            try:
                if httpx.get(f"{srv.url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        assert httpx.get(f"{srv.url}/healthz").status_code == 200


def test_new_settings_are_checked():
    for bad, word in [({"keep_alive_s": 0}, "keep_alive_s"), ({"request_read_s": -1}, "request_read_s"),
                      ({"max_connections": 0}, "max_connections"), ({"shutdown_grace_s": -1}, "shutdown_grace_s"),
                      ({"max_body_bytes": 10}, "max_body_bytes"), ({"allowed_hosts": ()}, "allowed_hosts")]:
        with pytest.raises(ConfigError, match=word):
            ServeConfig(**bad)


# ------------------------------------------------------------------------------------------------ docs

def test_docs_are_off_by_default_and_the_schema_stays(client, files):
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    assert client.get("/openapi.json").status_code == 200
    with serve(files, docs=True) as srv:
        assert httpx.get(f"{srv.url}/docs").status_code == 200


# ----------------------------------------------------------------------------------------- graceful shutdown

def test_sigterm_answers_queued_requests_before_exit(files):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "malex.cli", "serve", str(files["guard"]), "--model",
                             str(files["model"]), "--port", str(port), "--max-batch", "8", "--max-wait-ms", "3000",
                             "--log-level", "warning"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    answers: list[int] = []
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            wait_until_serving(c, proc)

            def send(i: int) -> None:
                with httpx.Client(base_url=url, timeout=60) as own:
                    res = own.post("/v1/screen", content=npy(files["x"][i : i + 1].numpy()),
                                   headers={"content-type": "application/x-npy"})
                    answers.append(res.status_code)

            threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            for _ in range(600):  # wait until all four wait in the batcher's queue
                text = c.get("/metrics").text
                if 'malex_queue_inputs{batcher="screen"} 4.0' in text:
                    break
                time.sleep(0.02)
            else:
                pytest.fail("the four requests never queued")
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=60)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert answers == [200] * 4
    assert code in (0, -signal.SIGTERM)  # uvicorn ends by re-raising the signal it drained on


def test_cli_serve_refuses_a_public_host_without_a_key(files, monkeypatch, capsys, tmp_path):
    from malex.cli import main

    def run(*args) -> tuple[int, list[str]]:
        monkeypatch.setattr(sys, "argv", ["malex", "serve", str(files["guard"]), "--model", str(files["model"]),
                                          *map(str, args)])
        with pytest.raises(SystemExit) as info:
            main()
        return info.value.code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]

    code, lines = run("--host", "0.0.0.0")
    assert code == 2 and len(lines) == 1 and "--api-key-file" in lines[0] and "--allow-unauthenticated" in lines[0]
    code, lines = run("--host", "0.0.0.0", "--api-key-file", tmp_path / "missing")
    assert code == 2 and len(lines) == 1 and "cannot read the API key file" in lines[0]
    code, lines = run("--open-endpoint", "/v1/screen")
    assert code == 2 and len(lines) == 1 and "open_endpoints" in lines[0]
