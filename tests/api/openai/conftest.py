"""Shared by the /v1 tests: a seeded tiny adapter registered as a fine-tune, a real API and worker on Redis +
PostgreSQL or on the embedded default, batch files of AG News chat requests, and waiting on a batch."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import AG_NEWS_DIR, make_tiny_adapter

LABELS = ["World", "Sports", "Business", "Sci/Tech"]
TOKEN = "openai-sdk-test-token"


def articles(n: int) -> list[str]:
    with (AG_NEWS_DIR / "train.jsonl").open(encoding="utf-8") as fh:
        return [json.loads(line)["text"] for _, line in zip(range(n), fh)]


def chat_line(custom_id: str, model: str, text: str, **extra) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "guided_choice": LABELS,
            "logprobs": True, "top_logprobs": 4, **extra}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})


# Its own Redis database: a worker of another test session on the shared one would take these tasks.
REDIS_URL = "redis://127.0.0.1:6379/12"


@pytest.fixture
def redis_url():
    import redis
    r = redis.Redis.from_url(REDIS_URL)
    try:
        r.flushdb()
    except redis.exceptions.ConnectionError as e:
        pytest.fail(f"Redis at {REDIS_URL} is needed for this test ({e})")
    yield REDIS_URL
    r.flushdb()


def make_stack(stack_factory, tiny_model_dir, tmp_path, *, pg_url: str | None, redis_url: str | None,
               workers: int = 1):
    """API + worker(s) with the tiny adapter registered (`st.adapter_id`, `st.ft` its model name): on Redis +
    PostgreSQL (a fresh schema), or on the embedded default when both URLs are None."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import Session
    from db.models import ModelArtifact
    extra = {"NEWSLORA_API_TOKEN": TOKEN, "NEWSLORA_MODEL_ROOTS": json.dumps([str(Path(tiny_model_dir).parent)])}
    if pg_url:
        eng = create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://"))
        with eng.begin() as c:
            c.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
        st = stack_factory(database_url=pg_url, broker_url=redis_url, NEWSLORA_VISIBILITY_TIMEOUT_S="5", **extra)
    else:
        st = stack_factory(**extra)
    st.start_api()  # migrates the store
    for i in range(workers):
        st.start_worker(f"worker{i or ''}")
    if not pg_url:
        eng = create_engine(f"sqlite:///{st.env['NEWSLORA_HOME']}/newslora.sqlite")
    adapter_dir = make_tiny_adapter(tiny_model_dir, tmp_path / "adapter", LABELS)
    with Session(eng) as s, s.begin():
        art = ModelArtifact(kind="adapter", name="tiny-lora", base_model=str(tiny_model_dir), path=str(adapter_dir),
                            spec={"suffix": "agnews"})
        s.add(art)
        s.flush()
        st.adapter_id = art.id
    eng.dispose()
    st.ft = f"ft:tiny-llama:newslora:agnews:{st.adapter_id}"
    return st


@pytest.fixture
def stack(stack_factory, pg_url, redis_url, tiny_model_dir, tmp_path):
    return make_stack(stack_factory, tiny_model_dir, tmp_path, pg_url=pg_url, redis_url=redis_url)


def sdk(st, **kw):
    from openai import OpenAI
    return OpenAI(base_url=f"{st.url}/v1", api_key=TOKEN, **{"max_retries": 0, **kw})


def wait_batch(client, batch_id: str, *, timeout: float = 240, until=("completed", "failed", "cancelled")):
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        b = client.batches.retrieve(batch_id)
        seen.append(b.request_counts.completed)
        if b.status in until:
            return b, seen
        time.sleep(0.05)
    raise AssertionError(f"batch {batch_id} still {b.status} after {timeout} s")


def lines_of(client, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines() if x.strip()]


def batch_file(path: Path, ft: str, n: int, prefix: str = "req-") -> Path:
    path.write_text("\n".join(chat_line(f"{prefix}{i}", ft, a) for i, a in enumerate(articles(n))) + "\n")
    return path
