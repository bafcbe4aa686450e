"""The /v1 surface driven by the official `openai` SDK, unmodified, against a real API and a real worker on
Redis + PostgreSQL: files, a batch of chat requests over a fine-tune's labels, a cancelled batch's partial
output, a synchronous chat completion with label logprobs, and the batch's labels against a native
classify job's over the same articles and adapter."""
from __future__ import annotations

import json
import math
import time

import httpx
import pytest

from tests.api.openai.conftest import LABELS, TOKEN, articles, chat_line, lines_of, sdk, wait_batch


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.postgres
def test_the_official_sdk_drives_files_batches_models_and_chat(stack, tiny_model_dir, tmp_path):
    from openai import NotFoundError
    client = sdk(stack)

    # Models: the bases and the fine-tune, named ft:<base>:newslora:<suffix>:<id>, its base as parent.
    models = {m.id: m for m in client.models.list()}
    ft = f"ft:tiny-llama:newslora:agnews:{stack.adapter_id}"
    assert "smollm2-135m" in models and ft in models, list(models)
    assert client.models.retrieve(ft).id == ft and models[ft].model_extra.get("parent") == "tiny-llama"
    with pytest.raises(NotFoundError):
        client.models.retrieve("ft:nope:newslora::999999")

    # A batch of 200 chat requests over the fine-tune's labels, with one malformed line and one with another url.
    arts = articles(200)
    lines = [chat_line(f"req-{i}", ft, a) for i, a in enumerate(arts)]
    lines.insert(10, "{not json")  # line 11
    lines.insert(20, json.dumps({"custom_id": "wrong-url", "method": "POST", "url": "/v1/embeddings", "body": {}}))
    path = tmp_path / "batch.jsonl"
    path.write_text("\n".join(lines) + "\n")
    f = client.files.create(file=path.open("rb"), purpose="batch")
    assert f.purpose == "batch" and f.bytes == path.stat().st_size and f.status == "processed"
    assert client.files.retrieve(f.id).filename == "batch.jsonl"
    assert f.id in [x.id for x in client.files.list(purpose="batch")]
    assert client.files.content(f.id).content == path.read_bytes()

    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                                  metadata={"run": "sdk-test"})
    assert batch.status in ("validating", "in_progress") and batch.request_counts.total == 202
    done, seen = wait_batch(client, batch.id)
    assert done.status == "completed", (done.errors, stack.log("worker")[-3000:])
    assert done.request_counts.completed == 200 and done.request_counts.failed == 2
    assert any(0 < c < 200 for c in seen), f"request_counts never moved while it ran: {seen[:50]}"
    assert done.metadata == {"run": "sdk-test"} and done.output_file_id and done.error_file_id
    assert batch.id in [b.id for b in client.batches.list()]

    out = lines_of(client, done.output_file_id)
    ids = [x["custom_id"] for x in out]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(200))  # every request answered once
    labels = {}
    for x in out:
        assert x["response"]["status_code"] == 200 and x["error"] is None
        body = x["response"]["body"]
        choice = body["choices"][0]
        label = choice["message"]["content"]
        assert label in LABELS and body["model"] == ft and body["object"] == "chat.completion"
        top = choice["logprobs"]["content"][0]["top_logprobs"]
        assert [t["token"] for t in top][0] == label and len(top) == 4
        assert abs(sum(math.exp(t["logprob"]) for t in top) - 1) < 1e-3
        assert choice["logprobs"]["content"][0]["logprob"] == top[0]["logprob"]
        labels[x["custom_id"]] = label
    errs = {e["error"]["line"]: e for e in lines_of(client, done.error_file_id)}
    assert set(errs) == {11, 21} and errs[11]["error"]["code"] == "invalid_json"
    assert errs[21]["custom_id"] == "wrong-url" and "line 21" in errs[21]["error"]["message"]

    # The same articles through a native classify job with the same adapter: the same labels.
    h = {"Authorization": f"Bearer {TOKEN}"}
    spec = {"items": [{"id": f"req-{i}", "text": a} for i, a in enumerate(arts)], "model": str(tiny_model_dir),
            "adapter_id": stack.adapter_id}
    job = httpx.post(f"{stack.url}/jobs", json={"kind": "classify", "spec": spec}, headers=h, timeout=30).json()
    c = stack.client()
    assert c.wait(job["id"], timeout=240)["status"] == "succeeded"
    native = {p["item_id"]: p["label"] for p in c.predictions(job["id"], limit=1000)["items"]}
    assert native == labels

    # A synchronous chat completion for one article, with the label probabilities.
    r = client.chat.completions.create(model=ft, messages=[{"role": "user", "content": arts[0]}],
                                       logprobs=True, top_logprobs=4, extra_body={"guided_choice": LABELS})
    assert r.choices[0].message.content == labels["req-0"]
    assert len(r.choices[0].logprobs.content[0].top_logprobs) == 4
    cr = client.completions.create(model=ft, prompt=[arts[0], arts[1]], logprobs=2)
    assert [ch.text for ch in cr.choices] == [labels["req-0"], labels["req-1"]]
    assert len(cr.choices[0].logprobs.top_logprobs[0]) == 2

    # A second batch, cancelled midway: what ran is kept, the rest is in the error file, nothing twice.
    more = articles(800)
    path2 = tmp_path / "batch2.jsonl"
    path2.write_text("\n".join(chat_line(f"c-{i}", ft, a) for i, a in enumerate(more)) + "\n")
    b2 = client.batches.create(input_file_id=client.files.create(file=path2.open("rb"), purpose="batch").id,
                               endpoint="/v1/chat/completions", completion_window="24h")
    wait_batch(client, b2.id, until=("in_progress",))
    deadline = time.monotonic() + 120
    while client.batches.retrieve(b2.id).request_counts.completed == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.batches.cancel(b2.id).status in ("cancelling", "cancelled")
    b2, _ = wait_batch(client, b2.id)
    assert b2.status == "cancelled", b2
    kept = lines_of(client, b2.output_file_id)
    rest = lines_of(client, b2.error_file_id)
    assert 0 < len(kept) < 800, len(kept)
    assert sorted(x["custom_id"] for x in kept + rest) == sorted(f"c-{i}" for i in range(800))
    assert {x["error"]["code"] for x in rest} == {"batch_cancelled"}
    assert b2.request_counts.completed == len(kept)

    # Files: deleting one, and another owner's view (none here) is a 404.
    assert client.files.delete(f.id).deleted is True
    with pytest.raises(NotFoundError):
        client.files.retrieve(f.id)
    assert "internal error" not in stack.log("api")
