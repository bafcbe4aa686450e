"""A /v1 batch survives its worker: SIGKILLed midway, the batch still completes with every `custom_id`
answered exactly once (Redis + PostgreSQL). And the SDK's batch flow on the embedded default (SQLite and
kombu's SQLAlchemy broker, no services): what a newcomer's `make demo` API answers."""
from __future__ import annotations

import time

import pytest

from tests.api.openai.conftest import LABELS, batch_file, lines_of, make_stack, sdk, wait_batch


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.postgres
def test_a_worker_killed_during_a_batch_every_request_answered_once(stack_factory, pg_url, redis_url,
                                                                   tiny_model_dir, tmp_path):
    st = make_stack(stack_factory, tiny_model_dir, tmp_path, pg_url=pg_url, redis_url=redis_url)
    client = sdk(st)
    n = 600
    f = client.files.create(file=batch_file(tmp_path / "in.jsonl", st.ft, n).open("rb"), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 120
    while client.batches.retrieve(b.id).request_counts.completed < 50:  # part of it stored
        assert time.monotonic() < deadline, st.log("worker")[-3000:]
        time.sleep(0.05)
    st.kill("worker")  # SIGKILL, midway
    at_kill = client.batches.retrieve(b.id).request_counts.completed
    assert 0 < at_kill < n, at_kill
    st.start_worker("worker2")
    b, seen = wait_batch(client, b.id, timeout=300)
    assert b.status == "completed", (b.errors, st.log("worker2")[-3000:])
    assert b.request_counts.completed == n and b.request_counts.failed == 0 and b.error_file_id is None
    out = lines_of(client, b.output_file_id)
    ids = [x["custom_id"] for x in out]
    assert len(ids) == n and set(ids) == {f"req-{i}" for i in range(n)}  # none twice, none missing
    assert all(x["response"]["body"]["choices"][0]["message"]["content"] in LABELS for x in out)
    assert seen == sorted(seen), "request_counts went backwards across the takeover"


@pytest.mark.slow
def test_the_sdk_batch_flow_on_the_embedded_default(stack_factory, tiny_model_dir, tmp_path):
    st = make_stack(stack_factory, tiny_model_dir, tmp_path, pg_url=None, redis_url=None)
    assert "DATABASE_URL" not in st.env and "BROKER_URL" not in st.env
    client = sdk(st)
    assert st.ft in {m.id for m in client.models.list()}
    f = client.files.create(file=batch_file(tmp_path / "in.jsonl", st.ft, 40).open("rb"), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                              extra_headers={"Idempotency-Key": "demo-1"})
    again = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                                  extra_headers={"Idempotency-Key": "demo-1"})
    assert again.id == b.id
    b, _ = wait_batch(client, b.id, timeout=300)
    assert b.status == "completed" and b.request_counts.completed == 40, (b, st.log("worker")[-3000:])
    out = lines_of(client, b.output_file_id)
    assert sorted(x["custom_id"] for x in out) == sorted(f"req-{i}" for i in range(40))
    labels = {x["custom_id"]: x["response"]["body"]["choices"][0]["message"]["content"] for x in out}
    r = client.chat.completions.create(model=st.ft, messages=[{"role": "user", "content": "x"}], logprobs=True,
                                       top_logprobs=4, extra_body={"guided_choice": LABELS})
    assert r.choices[0].message.content in LABELS and len(r.choices[0].logprobs.content[0].top_logprobs) == 4
    assert set(labels.values()) <= set(LABELS)
