"""The HTTP API in-process (FastAPI TestClient) on SQLite and PostgreSQL with real Redis as the broker."""
from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from core.settings import reset_settings


@pytest.fixture
def api(store_url, redis_url, monkeypatch, tmp_path):
    monkeypatch.setenv("NEWSLORA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DATABASE_URL", store_url)
    monkeypatch.setenv("BROKER_URL", redis_url)
    reset_settings()
    from api.app import app
    with TestClient(app) as client:
        yield client
    reset_settings()


def test_create_get_list_and_cancel(api):
    r = api.post("/jobs", json={"kind": "noop", "spec": {"steps": 3}})
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["status"] == "queued" and job["spec"]["steps"] == 3 and job["code_version"]
    assert api.get(f"/jobs/{job['id']}").json()["id"] == job["id"]
    listed = api.get("/jobs", params={"kind": "noop", "status": "queued"}).json()
    assert listed["total"] == 1 and listed["items"][0]["id"] == job["id"]
    events = api.get(f"/jobs/{job['id']}/events").json()
    assert [e["message"] for e in events] == ["queued"]
    assert api.post(f"/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    r = api.post(f"/jobs/{job['id']}/cancel")
    assert r.status_code == 409 and "already cancelled" in r.json()["detail"]


@pytest.mark.parametrize("send", ["body", "header"])
def test_idempotency_key_returns_the_same_job_for_the_same_submission(api, send):
    def post(spec):
        if send == "body":
            return api.post("/jobs", json={"kind": "noop", "spec": spec, "idempotency_key": "batch-7"})
        return api.post("/jobs", json={"kind": "noop", "spec": spec}, headers={"Idempotency-Key": "batch-7"})
    a, b = post({"steps": 2}), post({"steps": 2})
    assert (a.status_code, b.status_code) == (201, 200), b.text
    assert a.json()["id"] == b.json()["id"] and a.json()["idempotency_key"] == "batch-7"
    assert post({"steps": 2, "sleep_s": 0.0}).status_code == 200  # a default spelled out is the same spec
    assert api.get("/jobs").json()["total"] == 1


@pytest.mark.parametrize("first, second", [("body", "body"), ("header", "header"), ("body", "header"),
                                           ("header", "body")])
def test_idempotency_key_reused_with_another_submission_is_409_naming_the_first_job(api, first, second):
    def post(spec, send):
        if send == "body":
            return api.post("/jobs", json={"kind": "noop", "spec": spec, "idempotency_key": "k-1"})
        return api.post("/jobs", json={"kind": "noop", "spec": spec}, headers={"Idempotency-Key": "k-1"})
    a = post({"steps": 1}, first)
    b = post({"steps": 2}, second)
    assert a.status_code == 201 and b.status_code == 409, b.text
    assert f"job {a.json()['id']}" in b.json()["detail"] and "k-1" in b.json()["detail"]
    assert api.get("/jobs").json()["total"] == 1


def test_idempotency_key_in_header_and_body_must_agree(api):
    r = api.post("/jobs", json={"kind": "noop", "spec": {}, "idempotency_key": "a"}, headers={"Idempotency-Key": "b"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]
    r = api.post("/jobs", json={"kind": "noop", "spec": {}, "idempotency_key": "a"}, headers={"Idempotency-Key": "a"})
    assert r.status_code == 201
    assert api.get("/jobs").json()["total"] == 1


@pytest.mark.parametrize("body, status, needle", [
    ({"kind": "bake", "spec": {}}, 422, "unknown job kind"),
    ({"kind": "noop", "spec": {"steps": -1}}, 422, "greater than or equal"),
    ({"kind": "noop", "spec": {"steps": "many"}}, 422, "valid integer"),
    ({"kind": "noop", "spec": {"stepz": 1}}, 422, "Extra inputs"),
    ({"kind": "train", "spec": {}}, 422, "dataset_id"),
    ({"kind": "classify", "spec": {"items": []}}, 422, "items is empty"),
    ({"kind": "noop", "spec": {}, "extra": 1}, 422, "extra"),
    ({"kind": "noop", "spec": {}, "parent_id": 424242}, 404, "no job with id"),
])
def test_bad_submissions_are_refused_and_nothing_is_written(api, body, status, needle):
    r = api.post("/jobs", json=body)
    assert r.status_code == status
    assert needle.lower() in r.text.lower()
    assert api.get("/jobs").json()["total"] == 0


def test_every_422_has_the_documented_list_shape(api):
    for r in (api.post("/jobs", json={"kind": "bake", "spec": {}}),  # was a string detail
              api.post("/jobs", json={"kind": "", "spec": {}}),
              api.post("/jobs", json={"kind": "noop", "spec": {"steps": -1}}),
              api.post("/jobs", json={"kind": "noop", "spec": {}, "idempotency_key": "a\x00b"}),
              api.get("/jobs", params={"kind": "bake"}),
              api.get("/jobs/0")):
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert isinstance(detail, list) and detail, r.text
        assert all(set(e) == {"loc", "msg", "type"} and isinstance(e["loc"], list) for e in detail), r.text
    r = api.post("/jobs", json={"kind": "bake", "spec": {}})
    assert r.json()["detail"][0]["loc"] == ["body", "kind"] and "use one of noop" in r.json()["detail"][0]["msg"]


MAX_ID, MAX_OFFSET = 2**31 - 1, 2**63 - 1  # ids: INTEGER columns (32-bit on PostgreSQL); offsets: 64-bit


@pytest.mark.parametrize("path", ["/jobs/{}", "/jobs/{}/events", "/jobs/{}/predictions", "/jobs/{}/predictions.jsonl",
                                  "/jobs/{}/judge_scores", "/datasets/{}", "/models/{}", "/evaluations/{}"])
def test_ids_beyond_the_stores_range_are_422_not_500(api, path):
    # Were HTTP 500: OverflowError on SQLite past 64 bits, "integer out of range" on PostgreSQL past 32.
    for too_big in (MAX_ID + 1, 2**63, 10451272001621609724822163554304):
        r = api.get(path.format(too_big))
        assert r.status_code == 422, r.text
        assert f"less than or equal to {MAX_ID}" in r.json()["detail"][0]["msg"]
    assert api.get(path.format(MAX_ID)).status_code == 404  # the largest id is still an id


@pytest.mark.parametrize("path, param, limit", [
    ("/datasets", "offset", MAX_OFFSET), ("/models", "offset", MAX_OFFSET), ("/evaluations", "offset", MAX_OFFSET),
    ("/jobs", "offset", MAX_OFFSET), ("/jobs", "parent_id", MAX_ID), ("/jobs/{}/events", "after_id", MAX_ID),
    ("/jobs/{}/predictions", "offset", MAX_OFFSET)])
def test_offsets_and_ids_in_queries_beyond_range_are_422_not_500(api, path, param, limit):
    job_id = api.post("/jobs", json={"kind": "noop", "spec": {}}).json()["id"]
    for too_big in (limit + 1, 10000000000000000001 if limit == MAX_ID else 2**70):
        r = api.get(path.format(job_id), params={param: too_big})
        assert r.status_code == 422, r.text
        assert f"less than or equal to {limit}" in r.json()["detail"][0]["msg"]
    r = api.get(path.format(job_id), params={param: limit})  # the largest is still valid: an empty page
    assert r.status_code == 200, r.text


def test_ids_beyond_range_in_a_submission_and_a_cancel_are_422(api):
    assert api.post("/jobs", json={"kind": "noop", "spec": {}, "parent_id": MAX_ID + 1}).status_code == 422
    assert api.post(f"/jobs/{2**63}/cancel").status_code == 422
    assert api.get("/jobs").json()["total"] == 0


def test_allow_header_lists_every_method_of_the_path(api):
    r = api.request("OPTIONS", "/jobs")  # /jobs answers GET and POST: Starlette said `Allow: POST`
    assert r.status_code == 405
    assert {m.strip() for m in r.headers["allow"].split(",")} >= {"GET", "POST"}
    r = api.delete("/jobs/1")
    assert r.status_code == 405 and "DELETE" not in r.headers["allow"] and "GET" in r.headers["allow"]
    assert api.put("/jobs/1/cancel").headers["allow"] == "POST"


def test_times_are_utc_with_their_offset(api):
    job = api.post("/jobs", json={"kind": "noop", "spec": {}}).json()
    from datetime import datetime, timedelta, timezone
    created = datetime.fromisoformat(job["created_at"])
    assert created.utcoffset() == timedelta(0)  # RFC 3339 date-time: was naive ("...T05:32:06.321077")
    assert abs((datetime.now(timezone.utc) - created).total_seconds()) < 120
    assert datetime.fromisoformat(api.get(f"/jobs/{job['id']}/events").json()[0]["time"]).utcoffset() == timedelta(0)


def test_job_kinds_are_the_specs_and_the_task_names():
    from typing import get_args
    from api.schemas import JobKind, JobStatus
    from broker.app import TASK_NAMES
    from db.models import JOB_STATUSES
    from core.specs import QUEUES, SPECS
    assert set(get_args(JobKind)) == set(SPECS) == set(QUEUES) == set(TASK_NAMES)
    assert get_args(JobStatus) == JOB_STATUSES


def test_every_route_documents_its_error_statuses_and_bodies(api):
    schema = api.get("/openapi.json").json()
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            codes = set(op["responses"])
            assert "401" in codes, (method, path)
            if "{" in path:
                assert {"404", "422"} <= codes, (method, path)
            for code, resp in op["responses"].items():
                if code.startswith(("4", "5")):
                    body = resp["content"]["application/json"]["schema"]
                    if path.startswith("/v1/"):  # OpenAI's error body (api/routers/openai/errors.py), 401 too
                        assert body["required"] == ["error"], (method, path, code)
                        continue
                    ref = body["$ref"]
                    assert ref.endswith("/ValidationErrorOut" if code == "422" else "/ErrorOut"), (method, path, code)
    create = schema["paths"]["/jobs"]["post"]
    assert {"200", "201", "400", "403", "404", "409", "413", "422", "503"} <= set(create["responses"])
    assert any(p["name"] == "Idempotency-Key" and p["in"] == "header" for p in create["parameters"])
    kind = schema["components"]["schemas"]["JobCreate"]["properties"]["kind"]
    assert {"noop", "prep", "train", "classify", "judge", "evaluate", "pipeline"} <= set(kind["enum"])
    from core.specs import SPECS
    assert set(kind["enum"]) == set(SPECS)


def test_a_path_with_a_nul_byte_is_403_not_500(store_url, redis_url, monkeypatch, tmp_path):
    import json
    monkeypatch.setenv("NEWSLORA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DATABASE_URL", store_url)
    monkeypatch.setenv("BROKER_URL", redis_url)
    monkeypatch.setenv("NEWSLORA_DATA_ROOTS", json.dumps([str(tmp_path)]))
    reset_settings()
    from api.app import app
    with TestClient(app) as api:
        for spec in ({"input_file": f"{tmp_path}/in\x00.jsonl"},
                     {"items": [{"id": "a", "text": "b"}], "model": "/m\x00"}):
            r = api.post("/jobs", json={"kind": "classify", "spec": spec})
            assert r.status_code == 403, r.text  # was a 500: ValueError("embedded null byte") from Path.resolve
        assert api.get("/jobs").json()["total"] == 0
    reset_settings()


def test_unknown_ids_are_404(api):
    for path in ("/jobs/999", "/jobs/999/events", "/jobs/999/predictions", "/datasets/999", "/models/999",
                 "/evaluations/999"):
        r = api.get(path)
        assert r.status_code == 404, path
    assert api.post("/jobs/999/cancel").status_code == 404


def test_openapi_schema_is_served(api):
    schema = api.get("/openapi.json").json()
    assert "/jobs" in schema["paths"] and "/jobs/{job_id}/cancel" in schema["paths"]


def test_broker_down_at_submission_is_503_and_no_row(store_url, monkeypatch, tmp_path):
    from tests.conftest import free_port
    monkeypatch.setenv("NEWSLORA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DATABASE_URL", store_url)
    monkeypatch.setenv("BROKER_URL", f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    reset_settings()
    from api.app import app
    with TestClient(app) as api:
        r = api.post("/jobs", json={"kind": "noop", "spec": {}})
        assert r.status_code == 503 and "broker is unavailable" in r.json()["detail"]
        assert api.get("/jobs").json()["total"] == 0
    reset_settings()


def test_database_down_at_submission_is_503(monkeypatch, tmp_path, redis_url):
    from tests.conftest import free_port
    monkeypatch.setenv("NEWSLORA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres@127.0.0.1:{free_port()}/test")
    monkeypatch.setenv("BROKER_URL", redis_url)
    reset_settings()
    from api.app import app
    api = TestClient(app)  # no lifespan: the database is down from the start
    r = api.post("/jobs", json={"kind": "noop", "spec": {}})
    assert r.status_code == 503 and "database is unavailable" in r.json()["detail"]
    assert "Traceback" not in r.text
    reset_settings()


def test_token_required_beyond_loopback(store_url, redis_url, monkeypatch, tmp_path):
    monkeypatch.setenv("NEWSLORA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DATABASE_URL", store_url)
    monkeypatch.setenv("BROKER_URL", redis_url)
    monkeypatch.setenv("NEWSLORA_API_HOST", "0.0.0.0")
    monkeypatch.setenv("NEWSLORA_API_TOKEN", "s3cret-token")
    reset_settings()
    from api.app import app
    with TestClient(app) as api:
        assert api.get("/jobs").status_code == 401
        assert api.get("/health", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = api.get("/jobs", headers={"Authorization": "Bearer s3cret-token"})
        assert ok.status_code == 200
    reset_settings()


def test_no_token_beyond_loopback_refuses_to_start(monkeypatch, tmp_path, store_url):
    monkeypatch.setenv("NEWSLORA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DATABASE_URL", store_url)
    monkeypatch.setenv("NEWSLORA_API_HOST", "0.0.0.0")
    monkeypatch.delenv("NEWSLORA_API_TOKEN", raising=False)
    reset_settings()
    from api.app import app
    with pytest.raises(RuntimeError, match="NEWSLORA_API_TOKEN"):
        with TestClient(app):
            pass
    reset_settings()


@pytest.mark.parametrize("kind, spec", [
    ("classify", {"input_file": "/etc/passwd"}),
    ("classify", {"items": [{"id": "a", "text": "b"}], "model": "/etc"}),
    ("train", {"dataset_id": 1, "model": "~/.ssh"}),
    ("judge", {"classify_job_id": 1, "model": "/etc"}),
    ("prep", {"train": {"path": "/etc/passwd", "format": "csv"}, "test": None}),
    ("prep", {"train": {"path": "x.jsonl"}, "test": {"path": "../../etc/passwd", "format": "jsonl"}}),
    ("pipeline", {"prep": {"train": {"path": "/etc/passwd"}, "test": None}}),
    ("pipeline", {"model": "/etc"}),
])
def test_every_kinds_paths_outside_the_data_roots_are_403(store_url, redis_url, monkeypatch, tmp_path, kind, spec):
    import json
    monkeypatch.setenv("NEWSLORA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DATABASE_URL", store_url)
    monkeypatch.setenv("BROKER_URL", redis_url)
    monkeypatch.setenv("NEWSLORA_DATA_ROOTS", json.dumps([str(tmp_path / "data")]))
    reset_settings()
    from api.app import app
    with TestClient(app) as api:
        r = api.post("/jobs", json={"kind": kind, "spec": spec})
        assert r.status_code == 403, r.text
        assert re.search(r"outside the allowed (data|model) folders", r.json()["detail"])  # models: their own roots
        assert api.get("/jobs").json()["total"] == 0
    reset_settings()
