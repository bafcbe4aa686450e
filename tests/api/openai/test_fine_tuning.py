"""`/v1/fine_tuning/jobs` driven by the official `openai` SDK, unmodified, against a real API and a real worker:
on the embedded default (SQLite + SQLAlchemy broker) and on Redis + PostgreSQL. A tiny seeded Llama trains in
seconds on a few dozen AG News articles in the chat format."""
from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest

LABELS = ["World", "Sports", "Business", "Sci/Tech"]
SYSTEM = "Classify the news article as World, Sports, Business or Sci/Tech."


def _articles(ag_news_dir: Path, per_label: int, skip: int = 0) -> list[tuple[str, str]]:
    """`per_label` articles of each label, from the `skip`th line of the shared AG News train file on."""
    out: dict[str, list[str]] = {label: [] for label in LABELS}
    with (ag_news_dir / "train.jsonl").open(encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            row = json.loads(line)
            texts = out[LABELS[int(row["label"])]]
            if i >= skip and len(texts) < per_label:
                texts.append(row["text"])
            if all(len(t) == per_label for t in out.values()):
                break
    return [(text, label) for label, texts in out.items() for text in texts]


def _chat_file(rows: list[tuple[str, str]]) -> bytes:
    lines = [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text},
                           {"role": "assistant", "content": label}]} for text, label in rows]
    # a weight-0 answer is not trained on: this line is skipped, not a bad line
    lines.append({"messages": [{"role": "user", "content": "not an article"},
                               {"role": "assistant", "content": "no label", "weight": 0}]})
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


def _sdk(url: str):
    from openai import OpenAI
    return OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0, timeout=60)


TOKEN = "ft-test-token"


@pytest.fixture(params=["embedded", pytest.param("postgres", marks=[pytest.mark.postgres, pytest.mark.redis])])
def ft_stack(request, stack_factory, tiny_model_dir):
    """API + one worker: on the embedded default, or on Redis + PostgreSQL; the SDK sends a bearer token, and the
    tiny model's folder is an allowed model root."""
    extra = {"NEWSLORA_API_TOKEN": TOKEN, "NEWSLORA_MODEL_ROOTS": json.dumps([str(Path(tiny_model_dir).parent)])}
    if request.param == "postgres":
        from sqlalchemy import create_engine, text
        pg_url, redis_url = request.getfixturevalue("pg_url"), request.getfixturevalue("redis_url")
        eng = create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://"))
        with eng.begin() as c:
            c.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
        eng.dispose()
        extra.update(database_url=pg_url, broker_url=redis_url, NEWSLORA_VISIBILITY_TIMEOUT_S="5")
    st = stack_factory(**extra)
    st.start_api()
    st.start_worker()
    return st


def _wait(client, job_id: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    seen_running = False
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        seen_running |= job.status == "running"
        if job.status in ("succeeded", "failed", "cancelled"):
            return job, seen_running
        time.sleep(0.5)
    raise AssertionError(f"{job_id} still {job.status} after {timeout} s")


@pytest.mark.slow
def test_fine_tune_with_the_openai_sdk(ft_stack, tiny_model_dir, ag_news_dir):
    import openai
    client = _sdk(ft_stack.url)
    train = client.files.create(file=("train.jsonl", io.BytesIO(_chat_file(_articles(ag_news_dir, 10)))),
                                purpose="fine-tune")
    valid = client.files.create(file=("valid.jsonl", io.BytesIO(_chat_file(_articles(ag_news_dir, 2, skip=1000)))),
                                purpose="fine-tune")

    # Bad inputs are refused at creation, in OpenAI's error shape, naming the line.
    bad = client.files.create(file=("bad.jsonl", io.BytesIO(_chat_file(_articles(ag_news_dir, 1))[:-1] +
                                                             b"\n{\"messages\": 5}\n")), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=bad.id)
    assert "line 6" in e.value.message and e.value.body["param"] == "training_file"
    free = [(f"question {i}", f"a free-form answer number {i}") for i in range(20)]
    prose = client.files.create(file=("prose.jsonl", io.BytesIO(_chat_file(free))), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=prose.id)
    assert e.value.code == "invalid_label_set"
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-nosuchjob")

    job = client.fine_tuning.jobs.create(
        model=str(tiny_model_dir), training_file=train.id, validation_file=valid.id, suffix="agnews", seed=7,
        metadata={"team": "news"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 8}}})
    assert job.id.startswith("ftjob-") and job.status in ("validating_files", "queued", "running")
    assert (job.hyperparameters.n_epochs, job.hyperparameters.batch_size) == (2, 8)
    assert job.hyperparameters.learning_rate_multiplier == 1.0 and job.seed == 7
    other = client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=train.id,
                                           hyperparameters={"n_epochs": 1}, metadata={"team": "other"})
    client.fine_tuning.jobs.cancel(other.id)

    done, _ = _wait(client, job.id)
    assert done.status == "succeeded", (done.error, ft_stack.log("worker")[-3000:])
    assert done.fine_tuned_model.startswith("ft:") and ":newslora:agnews:" in done.fine_tuned_model
    assert done.trained_tokens and done.trained_tokens > 0 and done.finished_at >= done.created_at
    assert _wait(client, other.id)[0].status == "cancelled"

    # Events: newest first, paged with after/limit; one metrics event per step (40 lines / 8 = 5 steps, 2 epochs).
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=3))  # the SDK pages through them all
    assert len({e.id for e in events}) == len(events)
    assert events[0].message.startswith("New fine-tuned model created")
    metrics = [e for e in events if e.type == "metrics"]
    assert sorted(e.data["step"] for e in metrics) == list(range(1, 11))
    assert all(e.data["train_loss"] > 0 for e in metrics)
    validated = [e for e in metrics if "valid_loss" in e.data]
    assert {e.data["step"] for e in validated} == {5, 10}  # once an epoch
    assert all(0 <= e.data["valid_mean_token_accuracy"] <= 1 for e in validated)
    assert [e.created_at for e in events] == sorted((e.created_at for e in events), reverse=True)

    ckpts = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in ckpts] == [10, 5]
    assert ckpts[0].fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-step-10"
    assert ckpts[0].metrics.valid_loss is not None and ckpts[0].metrics.train_loss is not None

    # Lists: newest first, the metadata filter, after/limit paging.
    assert [j.id for j in client.fine_tuning.jobs.list(limit=1)] == [other.id, job.id]
    page = client.fine_tuning.jobs.list(metadata={"team": "news"})
    assert [j.id for j in page.data] == [job.id] and not page.has_more

    # The model is listed, named as the job names it, its base as parent.
    assert done.fine_tuned_model in {m.id for m in client.models.list()}
