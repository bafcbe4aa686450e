"""Every 503 tells the client when to try again (found by the soak, issue #27): with the broker down,
`POST /jobs` answered 503 without `Retry-After` (the database-down 503 and the /v1 routes' had it), so a
client that honours the header had nothing to go by."""
from __future__ import annotations

from fastapi.testclient import TestClient

from core.settings import reset_settings
from tests.conftest import free_port


def test_a_submission_with_the_broker_down_is_503_with_retry_after_and_no_row(monkeypatch, tmp_path):
    monkeypatch.setenv("NEWSLORA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'store.sqlite'}")
    monkeypatch.setenv("BROKER_URL", f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    reset_settings()
    from api.app import app
    try:
        with TestClient(app) as api:
            r = api.post("/jobs", json={"kind": "noop", "spec": {}}, headers={"Idempotency-Key": "k-1"})
            assert r.status_code == 503 and "broker is unavailable" in r.json()["detail"], r.text
            assert float(r.headers["retry-after"]) > 0
            assert api.get("/jobs").json()["total"] == 0  # nothing was created: a retry with the key is safe
    finally:
        reset_settings()
