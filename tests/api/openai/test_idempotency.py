"""`Idempotency-Key` on the /v1 routes that create something, driven by the official `openai` SDK (the key sent
as SDK users send it, `extra_headers`): a retry answers the first object and makes nothing new, the same key
on a different request is a 400 naming what it made, keys are per caller, and of concurrent requests with
one key exactly one creates. On SQLite and PostgreSQL, with real Redis as the broker (no worker: nothing
here needs a job to run)."""
from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from core.settings import reset_settings
from tests.api.openai.conftest import LABELS, TOKEN, articles, chat_line

CHAT_FILE = "".join(json.dumps({"messages": [{"role": "user", "content": text},
                                             {"role": "assistant", "content": LABELS[i % 4]}]}) + "\n"
                    for i, text in enumerate(articles(16))).encode()


@pytest.fixture
def api(store_url, redis_url, monkeypatch, tmp_path, tiny_model_dir):
    """(TestClient, the SDK as the admin, the SDK as a member)."""
    from openai import OpenAI
    monkeypatch.setenv("NEWSLORA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DATABASE_URL", store_url)
    monkeypatch.setenv("BROKER_URL", redis_url)
    monkeypatch.setenv("NEWSLORA_API_TOKEN", TOKEN)
    monkeypatch.setenv("NEWSLORA_MODEL_ROOTS", json.dumps([str(Path(tiny_model_dir).parent)]))
    reset_settings()
    from api.app import app
    with TestClient(app) as tc:
        r = tc.post("/tokens", json={"name": "alice"}, headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 201, r.text

        def sdk(token: str) -> OpenAI:
            return OpenAI(base_url="http://testserver/v1", api_key=token, max_retries=0, http_client=tc)
        yield tc, sdk(TOKEN), sdk(r.json()["token"])
    reset_settings()


def _key(k: str) -> dict:
    return {"extra_headers": {"Idempotency-Key": k}}


def _jobs(tc: TestClient) -> int:
    return tc.get("/jobs", headers={"Authorization": f"Bearer {TOKEN}"}).json()["total"]


def test_a_retried_upload_answers_the_first_file(api):
    import openai
    tc, admin, _ = api
    a = admin.files.create(file=("b.jsonl", io.BytesIO(b'{"x": 1}\n')), purpose="batch", **_key("up-1"))
    b = admin.files.create(file=("b.jsonl", io.BytesIO(b'{"x": 1}\n')), purpose="batch", **_key("up-1"))
    assert a.id == b.id and [f.id for f in admin.files.list()] == [a.id]
    with pytest.raises(openai.UnprocessableEntityError) as e:  # other bytes, same key
        admin.files.create(file=("b.jsonl", io.BytesIO(b'{"x": 2}\n')), purpose="batch", **_key("up-1"))
    assert e.value.code == "idempotency_key_reused" and a.id in e.value.message
    assert [f.id for f in admin.files.list()] == [a.id]
    # Without a key, the same upload is a new file; after a delete, the key makes a new one.
    c = admin.files.create(file=("b.jsonl", io.BytesIO(b'{"x": 1}\n')), purpose="batch")
    assert c.id != a.id
    admin.files.delete(a.id)
    d = admin.files.create(file=("b.jsonl", io.BytesIO(b'{"x": 1}\n')), purpose="batch", **_key("up-1"))
    assert d.id not in (a.id, c.id)
    # The same through the native route's delete.
    assert tc.delete(f"/files/{d.id}", headers={"Authorization": f"Bearer {TOKEN}"}).status_code in (200, 204)
    e = admin.files.create(file=("b.jsonl", io.BytesIO(b'{"x": 1}\n')), purpose="batch", **_key("up-1"))
    assert e.id not in (a.id, c.id, d.id)


def test_a_retried_batch_answers_the_first_batch_and_runs_one_job(api):
    import openai
    tc, admin, alice = api
    lines = "\n".join(chat_line(f"r{i}", "smollm2-135m", t) for i, t in enumerate(articles(5))) + "\n"
    f = admin.files.create(file=("in.jsonl", io.BytesIO(lines.encode())), purpose="batch")
    first = admin.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                                 metadata={"run": "1"}, **_key("batch-1"))
    assert first.status == "in_progress", first
    again = admin.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                                 metadata={"run": "1"}, **_key("batch-1"))
    assert again.id == first.id and _jobs(tc) == 1
    with pytest.raises(openai.UnprocessableEntityError) as e:
        admin.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                             metadata={"run": "2"}, **_key("batch-1"))
    assert e.value.code == "idempotency_key_reused" and e.value.body["param"] == "Idempotency-Key"
    assert [b.id for b in admin.batches.list()] == [first.id] and _jobs(tc) == 1
    # Keys are the caller's own: alice's "batch-1" is her batch (over her file), not the admin's.
    g = alice.files.create(file=("in.jsonl", io.BytesIO(lines.encode())), purpose="batch")
    hers = alice.batches.create(input_file_id=g.id, endpoint="/v1/chat/completions", completion_window="24h",
                                metadata={"run": "1"}, **_key("batch-1"))
    assert hers.id != first.id and _jobs(tc) == 2


def test_a_retried_fine_tuning_job_answers_the_first_job(api, tiny_model_dir):
    import openai
    tc, admin, _ = api
    train = admin.files.create(file=("t.jsonl", io.BytesIO(CHAT_FILE)), purpose="fine-tune")
    kw = dict(model=str(tiny_model_dir), training_file=train.id, suffix="x", hyperparameters={"n_epochs": 1})
    a = admin.fine_tuning.jobs.create(**kw, **_key("ft-1"))
    b = admin.fine_tuning.jobs.create(**kw, **_key("ft-1"))
    assert a.id == b.id and _jobs(tc) == 1
    with pytest.raises(openai.UnprocessableEntityError) as e:
        admin.fine_tuning.jobs.create(**{**kw, "suffix": "y"}, **_key("ft-1"))
    assert e.value.code == "idempotency_key_reused"
    assert admin.fine_tuning.jobs.create(**kw).id != a.id and _jobs(tc) == 2  # no key: a new job


@pytest.mark.redis
@pytest.mark.postgres
def test_concurrent_requests_with_one_key_make_one_batch(stack_factory, pg_url, redis_url):
    """Eight clients send the same batch with the same key at once to a real server on PostgreSQL: one batch,
    one job, every client answered 200 with its id."""
    from sqlalchemy import create_engine, text
    eng = create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://"))
    with eng.begin() as c:
        c.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    eng.dispose()
    st = stack_factory(database_url=pg_url, broker_url=redis_url, NEWSLORA_API_TOKEN=TOKEN)
    st.start_api()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    lines = "\n".join(chat_line(f"r{i}", "smollm2-135m", t) for i, t in enumerate(articles(3))) + "\n"
    f = httpx.post(f"{st.url}/v1/files", headers=auth, files={"file": ("in.jsonl", lines.encode())},
                   data={"purpose": "batch"}).json()
    body = {"input_file_id": f["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    answers: list[httpx.Response] = []
    gate = threading.Barrier(8)

    def send() -> None:
        gate.wait()
        answers.append(httpx.post(f"{st.url}/v1/batches", json=body, headers={**auth, "Idempotency-Key": "same"},
                                  timeout=60))
    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in answers] == [200] * 8, [r.text for r in answers if r.status_code != 200]
    assert len({r.json()["id"] for r in answers}) == 1
    assert httpx.get(f"{st.url}/jobs", headers=auth).json()["total"] == 1
    assert "internal error" not in st.log("api")
