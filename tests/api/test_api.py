"""The HTTP API in-process (FastAPI TestClient) on SQLite and PostgreSQL with real Redis as the broker."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from broker.settings import reset_settings


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


def test_idempotency_key_returns_the_same_job(api):
    a = api.post("/jobs", json={"kind": "noop", "spec": {}, "idempotency_key": "batch-7"})
    b = api.post("/jobs", json={"kind": "noop", "spec": {"steps": 9}, "idempotency_key": "batch-7"})
    assert (a.status_code, b.status_code) == (201, 200)
    assert a.json()["id"] == b.json()["id"]
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
