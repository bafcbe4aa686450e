"""Hostile and malformed input against the real API (uvicorn) and real workers: fuzzed job specs,
fuzzed data files, missing or wrong tokens, paths outside the data folders, oversized and chunked
bodies, pickle on the wire, and secrets in logs, events and errors."""
from __future__ import annotations

import base64
import json
import os
import pickle
import socket
import string
import sys
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.reliability.conftest import API_TOKEN, SECRETS, assert_no_secrets, wait_status

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

REFUSALS = {200, 201, 403, 404, 409, 413, 422}  # every answer a submission may get; never 500


def _start_api(stack, host: str = "127.0.0.1") -> None:
    stack._spawn("api", [sys.executable, "-m", "uvicorn", "api.app:app", "--host", host, "--port", str(stack.port),
                         "--log-level", "info"])
    deadline = time.monotonic() + 60
    while True:  # any answer will do: /health itself needs the token beyond loopback
        try:
            httpx.get(stack.url + "/health", timeout=2)
            return
        except httpx.TransportError:
            assert time.monotonic() < deadline, stack.log("api")[-3000:]
            time.sleep(0.2)


def _no_trace(r: httpx.Response) -> None:
    assert "Traceback" not in r.text and 'File "' not in r.text, r.text[:2000]
    for secret in SECRETS:
        assert secret not in r.text


# ---------------------------------------------------------------- the wire: JSON only, never pickle

def test_celery_accepts_and_sends_json_only():
    from broker.app import create_app
    conf = create_app().conf
    assert list(conf.accept_content) == ["json"]
    assert conf.task_serializer == conf.result_serializer == conf.event_serializer == "json"


def test_raw_messages_in_redis_are_json_and_a_pickle_message_is_refused(rel_stack_factory, own_redis, tmp_path):
    st = rel_stack_factory()
    _start_api(st)
    c = st.client()
    job = c.submit_noop(steps=1)  # no worker yet: the message waits in Redis
    r = own_redis.client()
    raw = r.lrange("cpu", 0, -1)
    assert len(raw) == 1
    envelope = json.loads(raw[0])
    assert envelope["content-type"] == "application/json" and envelope["content-encoding"] == "utf-8"
    assert envelope["properties"]["body_encoding"] == "base64"
    args, kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
    assert args == [job["id"]] and kwargs == {}
    assert envelope["headers"]["task"] == "newslora.noop"

    # A hostile producer puts a pickle on the queue: the worker must refuse to deserialize it.
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    evil = dict(envelope)
    evil["content-type"] = "application/x-python-serialize"
    evil["content-encoding"] = "binary"
    evil["body"] = base64.b64encode(pickle.dumps(((Exploit(),), {}, {}))).decode()
    evil["properties"] = {**envelope["properties"], "delivery_tag": "evil-1"}
    evil["headers"] = {**envelope["headers"], "id": "evil-1"}
    r.lpush("cpu", json.dumps(evil))

    st.start_worker()
    assert c.wait(job["id"], timeout=60)["status"] == "succeeded"
    deadline = time.monotonic() + 20
    while "untrusted content" not in st.log("worker") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "untrusted content" in st.log("worker"), st.log("worker")[-3000:]
    assert not marker.exists()
    assert st.procs["worker"].poll() is None  # the worker is still up
    assert c.wait(c.submit_noop(steps=1)["id"], timeout=60)["status"] == "succeeded"


# ---------------------------------------------------------------- the API's guards

def test_token_required_beyond_loopback(rel_stack_factory):
    st = rel_stack_factory(NEWSLORA_API_HOST="0.0.0.0", NEWSLORA_API_TOKEN=API_TOKEN)
    _start_api(st, host="0.0.0.0")
    url = st.url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_TOKEN},
                    {"Authorization": f"Basic {API_TOKEN}"}, {"Authorization": f"Bearer {API_TOKEN}x"}):
        for method, path in (("GET", "/health"), ("GET", "/jobs"), ("POST", "/jobs"), ("GET", "/jobs/1")):
            r = httpx.request(method, url + path, headers=headers, json={"kind": "noop", "spec": {}})
            assert r.status_code == 401, (headers, path, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            _no_trace(r)
    ok = httpx.get(url + "/jobs", headers={"Authorization": f"Bearer {API_TOKEN}"})
    assert ok.status_code == 200 and ok.json()["total"] == 0
    assert_no_secrets(st)


def test_api_beyond_loopback_without_a_token_refuses_to_start(rel_stack_factory):
    st = rel_stack_factory(NEWSLORA_API_HOST="0.0.0.0")
    st._spawn("api", [sys.executable, "-m", "uvicorn", "api.app:app", "--host", "0.0.0.0", "--port",
                      str(st.port)])
    assert st.procs["api"].wait(timeout=60) != 0
    assert "set NEWSLORA_API_TOKEN" in st.log("api")


@pytest.fixture
def guarded_api(rel_stack_factory, tmp_path):
    """The API with data roots and a token, and no worker (refused jobs must never reach a queue)."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "ok.jsonl").write_text('{"id": "a", "text": "fine"}\n')
    (root / "escape").symlink_to("/etc")
    st = rel_stack_factory(NEWSLORA_DATA_ROOTS=json.dumps([str(root)]), NEWSLORA_API_TOKEN=API_TOKEN,
                           NEWSLORA_MAX_BODY_BYTES="100000")
    _start_api(st)
    return st, root


def test_paths_outside_the_data_roots_are_refused(guarded_api, own_redis):
    st, root = guarded_api
    c = st.client()
    outside = ["/etc/passwd", f"{root}/../../../../etc/passwd", f"{root}/escape/passwd", "~/.ssh/id_rsa",
               "/proc/self/environ"]
    specs = []
    for p in outside:
        specs += [("classify", {"input_file": p}),
                  ("classify", {"items": [{"id": "1", "text": "x"}], "model": p}),
                  ("train", {"dataset_id": 1, "model": p}),
                  ("prep", {"train": {"path": p, "format": "jsonl"}, "test": None}),
                  ("prep", {"train": {"path": str(root / "ok.jsonl")}, "test": {"path": p, "format": "csv"}})]
    for kind, spec in specs:
        r = httpx.post(st.url + "/jobs", json={"kind": kind, "spec": spec},
                       headers={"Authorization": f"Bearer {API_TOKEN}"})
        assert r.status_code == 403, (kind, spec, r.text)
        assert "outside the allowed data folders" in r.json()["detail"]
        _no_trace(r)
    # Inside the root is accepted.
    assert c.submit_classify({"input_file": str(root / "ok.jsonl")})["status"] == "queued"
    assert c.list()["total"] == 1 and own_redis.client().llen("gpu") == 1


def test_oversized_bodies_are_refused_with_and_without_a_length(guarded_api):
    st, _ = guarded_api
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    big = json.dumps({"kind": "classify", "spec": {"items": [{"id": str(i), "text": "x" * 1000}
                                                             for i in range(200)]}}).encode()
    assert len(big) > 100_000
    r = httpx.post(st.url + "/jobs", content=big, headers={**auth, "Content-Type": "application/json"})
    assert r.status_code == 413 and "over 100000 bytes" in r.json()["detail"]

    def chunks():  # no Content-Length: Transfer-Encoding: chunked
        for i in range(0, len(big), 4096):
            yield big[i:i + 4096]
    r = httpx.post(st.url + "/jobs", content=chunks(), headers={**auth, "Content-Type": "application/json"})
    assert r.request.headers.get("transfer-encoding") == "chunked" and "content-length" not in r.request.headers
    assert r.status_code == 413, r.text
    _no_trace(r)
    # A lying Content-Length (small) with a bigger chunked body is cut at the limit too.
    raw = (b"POST /jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_TOKEN.encode() +
           b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    with socket.create_connection(("127.0.0.1", st.port), timeout=30) as s:
        s.sendall(raw)
        try:
            for i in range(0, 400_000, 8192):
                piece = b"x" * 8192
                s.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered 413 and closed: what we want
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # A body under the limit still works, and nothing was created by the refused ones.
    ok = httpx.post(st.url + "/jobs", json={"kind": "noop", "spec": {}}, headers=auth)
    assert ok.status_code == 201
    assert httpx.get(st.url + "/jobs", headers=auth).json()["total"] == 1
