"""Hostile and malformed input against the real API (uvicorn) and real workers: fuzzed job specs,
fuzzed data files, missing or wrong tokens, paths outside the data folders, oversized and chunked
bodies, pickle on the wire, and secrets in logs, events and errors."""
from __future__ import annotations

import re

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
        assert re.search(r"outside the allowed (data|model) folders", r.json()["detail"])  # models: their own roots
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
    raw = (b"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + API_TOKEN.encode() +
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


# ---------------------------------------------------------------- fuzzing: job specs through the real API

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False) |
                    st.text(max_size=30),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                max_size=4),
                    max_leaves=12)
VALID = {"noop": {"steps": 1}, "prep": {"train": {"path": "x.jsonl"}, "test": None},
         "classify": {"items": [{"id": "a", "text": "b"}]}, "train": {"dataset_id": 1},
         "judge": {"classify_job_id": 1}, "evaluate": {"classify_job_ids": [1]}, "pipeline": {}}
KINDS = st.sampled_from(sorted(VALID)) | st.sampled_from(["", "bake", "../noop", "noop\x00", "NOOP"]) | JSON


@st.composite
def submissions(draw):
    """Random JSON for kind and spec, or a valid spec with one field replaced by random JSON."""
    kind = draw(KINDS)
    how = draw(st.sampled_from(["valid", "mutated", "mutated", "random"]))
    if isinstance(kind, str) and kind in VALID and how != "random":
        spec = dict(VALID[kind])
        if how == "mutated":
            field = draw(st.sampled_from(sorted(spec) + ["model", "items", "steps", "sleep_s", "input_file",
                                                         "queue", "fail"]))
            spec[field] = draw(JSON | st.integers(0, 3) | st.sampled_from(["cpu", "gpu", "/etc", "smollm2-135m"]))
    else:
        spec = draw(JSON)
    body = {"kind": kind, "spec": spec}
    if draw(st.integers(0, 9)) == 0:
        body = draw(JSON)  # not even an object of the right shape
    return body


@pytest.fixture
def fuzz_stack(rel_stack_factory, tmp_path, smollm2_dir):
    root = tmp_path / "data"
    root.mkdir()
    st_ = rel_stack_factory(NEWSLORA_DATA_ROOTS=json.dumps([str(root)]), NEWSLORA_WAIT_RETRIES="3",
                            OLLAMA_HOST="http://127.0.0.1:9",  # judge jobs fail fast: nothing listens there
                            NEWSLORA_SMOLLM2_135M_DIR=str(smollm2_dir))  # the real model, converted once
    _start_api(st_)
    st_.start_worker(queues="cpu,gpu")  # fuzzed train and classify jobs really run, on the real SmolLM2
    return st_


@pytest.mark.slow
def test_fuzzed_submissions_end_in_success_or_a_clear_error(fuzz_stack):
    st_ = fuzz_stack
    http = httpx.Client(base_url=st_.url, timeout=30)
    statuses: dict[int, int] = {}

    @settings(max_examples=150, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(submissions())
    def one(body):
        r = http.post("/jobs", json=body)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code in REFUSALS, (body, r.status_code, r.text[:500])
        _no_trace(r)
        if r.status_code >= 400:
            assert isinstance(r.json()["detail"], (str, list)) and r.json()["detail"]
        else:  # accepted jobs may not run for ever: cap noop jobs by cancelling what is still running later
            assert r.json()["status"] == "queued"
    one()
    # Raw garbage too: not JSON, wrong content type, huge numbers, deep nesting.
    for raw in (b"", b"{", b"\xff\xfe", b"[]", b"null", b"1e999999", b'{"kind":"noop","spec":' * 200,
                json.dumps({"kind": "noop", "spec": {"steps": 10**30}}).encode()):
        r = http.post("/jobs", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code in (400, 422), (raw[:40], r.status_code, r.text[:300])
        _no_trace(r)
    assert statuses.get(201, 0) > 0 and statuses.get(422, 0) > 0, statuses

    # Every accepted job ends on its own (train and classify on the gpu worker too); what is still
    # queued or running after a while (long noop jobs) is cancelled, then every job is terminal.
    def settle(seconds: float) -> list[dict]:
        deadline = time.monotonic() + seconds
        while True:
            jobs = http.get("/jobs", params={"limit": 500}).json()["items"]
            if all(j["status"] in ("succeeded", "failed", "cancelled") for j in jobs) or time.monotonic() > deadline:
                return jobs
            time.sleep(0.5)
    for job in settle(120):
        if job["status"] in ("queued", "running"):
            http.post(f"/jobs/{job['id']}/cancel")
    jobs = settle(120)
    ran = {j["kind"] for j in jobs if j["status"] in ("succeeded", "failed")}
    assert ran & {"classify", "train"}, [(j["kind"], j["status"]) for j in jobs]  # the gpu worker ran them
    for j in jobs:
        assert j["status"] in ("succeeded", "failed", "cancelled"), j
        if j["error"]:
            assert "Traceback" not in j["error"] and len(j["error"]) < 5000
        for e in http.get(f"/jobs/{j['id']}/events").json():
            assert "Traceback" not in e["message"]
    # Neither the API nor the worker died, and both still do their work.
    assert st_.procs["api"].poll() is None and st_.procs["worker"].poll() is None
    ok = http.post("/jobs", json={"kind": "noop", "spec": {"steps": 1}}).json()
    assert st_.client().wait(ok["id"], timeout=60)["status"] == "succeeded"
    real = http.post("/jobs", json={"kind": "classify", "spec": {"items": [{"id": "a", "text": "Stocks fell."}]}})
    done = st_.client().wait(real.json()["id"], timeout=180)  # the real SmolLM2, on the gpu queue
    assert done["status"] == "succeeded" and done["result"]["classified"] == 1, (done["error"], st_.log("worker")[-3000:])
    assert_no_secrets(st_, *(j["error"] or "" for j in jobs))


# ---------------------------------------------------------------- fuzzing: the data readers

ROW_VALUES = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40) | \
    st.lists(st.integers(), max_size=3) | st.dictionaries(st.text(max_size=5), st.integers(), max_size=2)


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(fmt=st.sampled_from(["jsonl", "csv", "agnews_csv", "parquet", "auto"]),
       suffix=st.sampled_from([".jsonl", ".csv", ".parquet", ".txt", ""]),
       data=st.binary(max_size=600) | st.text(max_size=600).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_prep_readers_on_random_bytes_give_rows_or_a_prep_error(tmp_path_factory, fmt, suffix, data):
    from workers.data.loaders import PrepError, load_source
    from core.specs.prep import SourceSpec
    path = tmp_path_factory.mktemp("fuzz") / f"src{suffix}"
    path.write_bytes(data)
    try:
        src = load_source("train", SourceSpec(path=str(path), format=fmt), ["a", "b"])
    except PrepError as e:
        assert str(e) and "Traceback" not in str(e)
    else:
        assert all(r.problem is None or isinstance(r.problem, str) for r in src.rows)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(rows=st.lists(st.dictionaries(st.sampled_from(["text", "label", "id", "x"]), ROW_VALUES, max_size=4),
                     max_size=12),
       junk_lines=st.lists(st.text(max_size=30), max_size=3),
       on_bad_rows=st.sampled_from(["fail", "skip"]))
def test_prepare_dataset_on_random_rows_succeeds_or_says_why(tmp_path_factory, rows, junk_lines, on_bad_rows):
    from core.context import LocalContext
    from workers.data.loaders import PrepError
    from workers.data.prep import prepare_dataset
    from core.specs.prep import PrepSpec
    d = tmp_path_factory.mktemp("fuzzprep")
    lines = [json.dumps(r) for r in rows] + junk_lines
    (d / "train.jsonl").write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    spec = PrepSpec(train={"path": str(d / "train.jsonl")}, test=None, label_names=["a", "b"],
                    on_bad_rows=on_bad_rows, validation_fraction=0.0)
    try:
        meta = prepare_dataset(spec, d / "out", LocalContext(work_dir=d / "work"))
    except PrepError as e:
        assert str(e) and "Traceback" not in str(e)
    else:
        assert meta["splits"]["train"]["records"] >= 1


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(suffix=st.sampled_from([".jsonl", ".csv", ".txt"]),
       data=st.binary(max_size=400) | st.lists(st.dictionaries(st.sampled_from(["id", "text", "label"]), ROW_VALUES,
                                                               max_size=3), max_size=6)
       .map(lambda rs: "\n".join(json.dumps(r) for r in rs).encode()))
def test_classify_input_files_give_items_or_a_clear_error(tmp_path_factory, suffix, data):
    from workers.inference.items import InputFileError, load_items
    from core.specs.classify import ClassifySpec
    path = tmp_path_factory.mktemp("fuzzitems") / f"in{suffix}"
    path.write_bytes(data)
    try:
        items, rejected = load_items(ClassifySpec(input_file=str(path)), None)
    except InputFileError as e:
        assert str(e) and "Traceback" not in str(e)
    else:
        assert all(isinstance(i["text"], str) and i["id"] for i in items)
        assert all(r["reason"] for r in rejected)
