"""Faults against real processes: workers killed, Redis and PostgreSQL restarted, judge server failing,
time limits, and Redis re-delivery of a job that outlives the visibility timeout.

Redis and PostgreSQL here are this package's own servers on free ports (see conftest.py); the
machine's shared services are never restarted.
"""
from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import create_engine, text

from api_client.client import ApiError
from tests.reliability.conftest import assert_no_secrets, wait_status

pytestmark = [pytest.mark.redis, pytest.mark.postgres]


def _count(db_url: str, sql: str) -> int:
    eng = create_engine(db_url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with eng.connect() as c:
            return int(c.execute(text(sql)).scalar())
    finally:
        eng.dispose()


def _messages(client, job_id: int) -> list[str]:
    return [e["message"] for e in client.events(job_id, limit=1000)]


def _wait_ready(st, *workers: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not all(" ready." in st.log(w) for w in workers):
        assert time.monotonic() < deadline, "workers did not start: " + " ".join(st.log(w)[-2000:] for w in workers)
        time.sleep(0.2)


# ---------------------------------------------------------------- broker and store restarts

@pytest.mark.slow
def test_redis_restart_mid_batch_loses_nothing(rel_stack_factory, own_redis, rel_db_url):
    st = rel_stack_factory()
    st.start_api()
    st.start_worker()
    c = st.client()
    jobs = [c.submit_noop(steps=10, sleep_s=0.1)["id"] for _ in range(5)]
    wait_status(c, jobs[0], ("running", "succeeded"))
    own_redis.stop()
    before = c.list(limit=1)["total"]
    # While the broker is down a submission is refused with a clear 503 and leaves no row behind.
    with pytest.raises(ApiError) as e:
        c.submit_noop(steps=1)
    assert e.value.status == 503 and "broker is unavailable" in str(e.value.detail)
    assert c.list(limit=1)["total"] == before
    time.sleep(2)
    own_redis.start()
    jobs.append(c.submit_noop(steps=2)["id"])
    done = [c.wait(j, timeout=120) for j in jobs]
    assert [d["status"] for d in done] == ["succeeded"] * len(jobs), st.log("worker")[-4000:]
    for j in jobs:  # each finished exactly once, whatever Redis re-delivered
        assert _messages(c, j).count("succeeded") == 1
    time.sleep(6)  # past the visibility timeout: a restored message is dropped by the lease, not re-run
    assert all(c.get(j)["status"] == "succeeded" and c.get(j)["attempts"] == 1 for j in jobs)
    assert _count(rel_db_url, "SELECT count(*) FROM jobs") == len(jobs)
    assert_no_secrets(st)


def _drop_queued_message(redis_client, job_id: int) -> bool:
    """Take a job's task message out of the Redis queues (kombu's lists, one per queue and priority), as a
    broker that lost it would. Returns whether it was there."""
    import base64
    dropped = False
    for key in redis_client.scan_iter(match="*"):
        if redis_client.type(key) != b"list":
            continue
        for raw in redis_client.lrange(key, 0, -1):
            msg = json.loads(raw)
            body = msg.get("body", "")
            if msg.get("properties", {}).get("body_encoding") == "base64":
                body = base64.b64decode(body)
            args = json.loads(body)[0] if body else None
            if args == [job_id]:
                dropped |= bool(redis_client.lrem(key, 0, raw))
    return dropped


@pytest.mark.slow
def test_redis_killed_mid_batch_every_job_still_runs_once(rel_stack_factory, own_redis, rel_db_url):
    """SIGKILL, not a clean shutdown: Redis writes its append-only file once a second, so messages sent
    just before the kill may be gone. One message is lost for certain (taken out of the queue, before the
    kill and again after it if the append-only file brought it back): the reaper must re-send it (queued
    past NEWSLORA_REQUEUE_QUEUED_AFTER_S), and the lease drops any duplicate."""
    st = rel_stack_factory(NEWSLORA_REQUEUE_QUEUED_AFTER_S="4", NEWSLORA_LEASE_S="3", NEWSLORA_HEARTBEAT_S="0.5")
    st.start_api()
    st.start_worker()
    c = st.client()
    jobs = [c.submit_noop(steps=5, sleep_s=0.2)["id"] for _ in range(8)]  # about 8 s of work on one worker
    wait_status(c, jobs[0], ("running", "succeeded"))
    lost = jobs[-1]  # seven jobs ahead of it: still queued through the kill below
    assert _drop_queued_message(own_redis.client(), lost), "the last job's message should still be queued"
    time.sleep(1.5)  # the removal reaches the append-only file (fsync once a second)
    own_redis.kill()
    time.sleep(1)
    own_redis.start()
    _drop_queued_message(own_redis.client(), lost)  # in case the kill restored it: lost either way
    assert c.get(lost)["status"] == "queued"
    jobs.append(c.submit_noop(steps=2)["id"])
    done = [c.wait(j, timeout=180) for j in jobs]
    assert [d["status"] for d in done] == ["succeeded"] * len(jobs), st.log("worker")[-4000:]
    # The lost message came back only because the reaper re-sent it.
    assert f"job {lost}: queued for over 4 s; re-sending its message" in st.log("worker"), st.log("worker")[-4000:]
    time.sleep(6)  # re-sent or restored duplicates arrive: each is dropped by the lease, none re-runs a job
    for j in jobs:
        msgs = _messages(c, j)
        assert (msgs.count("running"), msgs.count("succeeded")) == (1, 1), (j, msgs)
        assert c.get(j)["status"] == "succeeded" and c.get(j)["attempts"] == 1
    assert _count(rel_db_url, "SELECT count(*) FROM jobs") == len(jobs)


@pytest.mark.slow
def test_postgres_restart_mid_batch_jobs_finish_and_nothing_half_written(rel_stack_factory, own_pg, rel_db_url):
    st = rel_stack_factory()
    st.start_api()
    st.start_worker()
    c = st.client()
    jobs = [c.submit_noop(steps=20, sleep_s=0.1)["id"] for _ in range(4)]
    wait_status(c, jobs[0], ("running",))
    time.sleep(0.5)
    own_pg.stop()
    # The API says the store is down (503, no stack trace) instead of hanging or crashing.
    with pytest.raises(ApiError) as e:
        c.get(jobs[0])
    assert e.value.status == 503 and "database is unavailable" in str(e.value.detail)
    assert "Traceback" not in str(e.value.detail)
    time.sleep(3)
    own_pg.start()
    deadline = time.monotonic() + 30
    while True:  # the API reconnects by itself
        try:
            c.health()
            break
        except ApiError:
            assert time.monotonic() < deadline, st.log("api")[-3000:]
            time.sleep(0.5)
    done = [c.wait(j, timeout=120) for j in jobs]
    # The running job's store writes waited out the outage (bounded retries): every job succeeds.
    assert [d["status"] for d in done] == ["succeeded"] * len(jobs), [d["error"] for d in done]
    assert "the database is unavailable while writing" in st.log("worker")
    for j in jobs:
        assert _messages(c, j).count(c.get(j)["status"]) == 1
    # Nothing half-written: every terminal job has its finish time, and no job is left without an outcome.
    assert _count(rel_db_url, "SELECT count(*) FROM jobs WHERE status IN ('queued','running')") == 0
    assert _count(rel_db_url, "SELECT count(*) FROM jobs WHERE finished_at IS NULL") == 0
    assert_no_secrets(st, *(d["error"] or "" for d in done))


# ---------------------------------------------------------------- time limit and re-delivery

def test_job_over_its_time_limit_is_failed_with_the_reason(rel_stack_factory):
    st = rel_stack_factory(NEWSLORA_JOB_TIME_LIMIT_S="2")
    st.start_api()
    st.start_worker()
    c = st.client()
    job = c.wait(c.submit_noop(steps=200, sleep_s=0.05)["id"], timeout=60)
    assert job["status"] == "failed", job
    assert job["error"] == "exceeded its time limit of 2 s"
    assert 0 < job["progress"] < 1
    assert c.events(job["id"], limit=1000)[-1]["level"] == "error"


@pytest.mark.slow
def test_job_longer_than_the_visibility_timeout_runs_once(rel_stack_factory):
    """Redis re-delivers the unacked message (visibility timeout 2 s) to an idle second worker while the
    first still runs the job; the lease drops that delivery."""
    st = rel_stack_factory(NEWSLORA_VISIBILITY_TIMEOUT_S="2")
    st.start_api()
    st.start_worker("w1")
    c = st.client()
    job = c.submit_noop(steps=70, sleep_s=0.2)  # 14 s: seven visibility timeouts
    wait_status(c, job["id"], ("running",))
    # kombu restores unacked messages older than the visibility timeout when a worker connects (and
    # about every 100 s after): the second worker, started past the timeout, gets the message again.
    time.sleep(2.5)
    st.start_worker("w2")
    done = c.wait(job["id"], timeout=90)
    assert done["status"] == "succeeded" and done["attempts"] == 1
    msgs = _messages(c, job["id"])
    assert msgs.count("running") == 1 and msgs.count("succeeded") == 1
    assert "taken over after its worker died" not in msgs
    logs = st.log("w1") + st.log("w2")
    assert "delivery dropped (busy)" in logs, logs[-4000:]
    assert "visibility timeout" in logs  # the startup warning about the inconsistent settings


def test_settings_flag_a_visibility_timeout_not_above_the_time_limit():
    from core.settings import Settings
    assert Settings().visibility_timeout_s > Settings().job_time_limit_s  # the defaults agree
    assert Settings(NEWSLORA_VISIBILITY_TIMEOUT_S=25200, NEWSLORA_JOB_TIME_LIMIT_S=21600).redelivery_warning() is None
    warning = Settings(NEWSLORA_VISIBILITY_TIMEOUT_S=3600, NEWSLORA_JOB_TIME_LIMIT_S=21600).redelivery_warning()
    assert "3600" in warning and "21600" in warning and "above the time limit" in warning


# ---------------------------------------------------------------- classification batch killed midway

def _news_items(n: int, prefix: str = "") -> list[dict]:
    topics = ["stocks fell as the central bank raised rates", "the striker scored twice in the final",
              "a new chip doubles battery life", "leaders met to discuss the ceasefire"]
    return [{"id": f"{prefix}{i}", "text": f"{topics[i % 4]} (report {i})"} for i in range(n)]


@pytest.mark.slow
def test_worker_killed_mid_classification_every_item_stored_exactly_once(rel_stack_factory, tiny_model_dir,
                                                                         rel_db_url):
    st = rel_stack_factory()
    st.start_api()
    st.start_worker()
    c = st.client()
    n = 1000
    gold = ["Business", "Sports", "Sci/Tech", "World"]
    items = [{**it, "label": gold[i % 4]} for i, it in enumerate(_news_items(n))]
    job = c.submit_classify({"items": items, "model": str(tiny_model_dir), "mode": "score",
                             "batch_size": 32, "dtype": "fp32", "device": "cpu"})
    deadline = time.monotonic() + 120
    while True:  # kill once part of the batch is stored, and well before the end
        stored = c.predictions(job["id"], limit=1)["total"]
        if stored >= 100:
            break
        assert time.monotonic() < deadline and c.get(job["id"])["status"] in ("queued", "running"), \
            st.log("worker")[-3000:]
        time.sleep(0.1)
    st.kill("worker")  # SIGKILL, mid-batch
    at_kill = c.predictions(job["id"], limit=1)["total"]
    assert 0 < at_kill < n, at_kill
    st.start_worker("worker2")
    done = c.wait(job["id"], timeout=180)
    assert done["status"] == "succeeded", (done["error"], st.log("worker2")[-3000:])
    assert done["attempts"] == 2
    ids = [p["item_id"] for p in c.iter_predictions(job["id"], page=1000)]
    assert len(ids) == n and set(ids) == {str(i) for i in range(n)}  # none missing, none twice
    assert _count(rel_db_url, f"SELECT count(*) FROM predictions WHERE job_id = {job['id']}") == n
    assert _count(rel_db_url, f"SELECT count(DISTINCT item_id) FROM predictions WHERE job_id = {job['id']}") == n
    assert _count(rel_db_url, f"SELECT count(*) FROM predictions WHERE job_id = {job['id']} "
                              "AND (label IS NULL OR error IS NOT NULL)") == 0
    msgs = _messages(c, job["id"])
    assert msgs.count("succeeded") == 1 and "taken over after its worker died" in msgs
    # The result describes the whole job, not only its last attempt: the second attempt skipped what the
    # first had stored, and counts and accuracy cover all 1,000 items.
    res = done["result"]
    assert res["skipped_done"] >= at_kill > 0, res
    assert res["attempt_classified"] == n - res["skipped_done"]
    assert res["classified"] == n and res["n_gold"] == n and res["total"] == n
    preds = list(c.iter_predictions(job["id"], page=1000))
    assert res["accuracy"] == pytest.approx(sum(p["label"] == p["gold"] for p in preds) / n)


# ---------------------------------------------------------------- the judge server failing

# control_pairs 0: this test counts the chats a failing server gets for the sampled items (the judge's control
# set, its validity check, is tested in tests/workers/judge/test_judge.py).
JUDGE = {"dialogue": True, "answer_max_new_tokens": 4, "sample": 4, "retries": 1, "backoff_s": 0.0,
         "timeout_s": 1.0, "concurrency": 2, "stream": False, "control_pairs": 0}


@pytest.mark.slow
def test_judge_server_refusing_hanging_or_failing_items_unscored_and_evaluation_completes(rel_stack_factory,
                                                                                          tiny_model_dir):
    import json
    from contextlib import ExitStack
    from tests.fakes.ollama_server import DEFAULT_REPLY, FakeOllama
    from tests.reliability.services import free_port
    with ExitStack() as servers:
        hanging, failing, flaky, dying = (servers.enter_context(f) for f in (
            FakeOllama(delay_s=4), FakeOllama(fail_first=10**6), FakeOllama(fail_first=2), FakeOllama()))
        nobody = f"http://127.0.0.1:{free_port()}"
        # The judge may call only the endpoints the server allows (NEWSLORA_JUDGE_URLS): these fakes' ports.
        allowed = [hanging.url, failing.url, flaky.url, dying.url, nobody]
        st = rel_stack_factory(NEWSLORA_JUDGE_URLS=json.dumps(allowed))
        st.start_api()
        st.start_worker()
        c = st.client()
        model = str(tiny_model_dir)
        items = [{**it, "label": ["World", "Sports", "Business", "Sci/Tech"][i % 4]}
                 for i, it in enumerate(_news_items(8))]
        cj = c.wait(c.submit_classify({"items": items, "model": model, "dtype": "fp32", "device": "cpu"})["id"],
                    timeout=120)
        assert cj["status"] == "succeeded", cj["error"]

        def judge(fake_url: str, **over) -> dict:
            return c.wait(c.submit_judge({**JUDGE, "model": model, "host": fake_url, **over})["id"], timeout=120)

        served = []

        def reply_then_die(_body):  # answers one chat, then stops listening: later ones are refused
            if not served:
                served.append(1)
                dying.stop()  # closes the listening socket; this request's connection still gets its answer
            return DEFAULT_REPLY
        dying.reply = reply_then_die
        hung, failed, recovered = judge(hanging.url), judge(failing.url), judge(flaky.url, retries=2)
        died = judge(dying.url, concurrency=1)
        assert failing.chats == 4 * 2  # each item tried 1 + retries times, no more
    refused = judge(nobody)

    for job, kind in ((hung, "did not answer in time"), (failed, "500"), (died, "")):
        assert job["status"] == "succeeded", job["error"]
        rows = c.judge_scores(job["id"])
        assert len(rows) == 4 and len({r["item_id"] for r in rows}) == 4  # every sampled item has its row
        unscored = [r for r in rows if r["status"] == "unscored"]
        assert unscored and all(r["error"] for r in unscored), (kind, rows)
        assert all(kind in r["error"] for r in unscored), [r["error"] for r in unscored]
        assert job["result"]["summary"]["n_unscored"] == len(unscored)
    assert len([r for r in c.judge_scores(hung["id"]) if r["status"] == "unscored"]) == 4
    assert len([r for r in c.judge_scores(died["id"]) if r["status"] == "scored"]) == 1
    assert recovered["status"] == "succeeded"
    assert all(r["status"] == "scored" for r in c.judge_scores(recovered["id"]))
    # Provenance survives the store: which backend and model digest gave each score, why one was not given.
    for row in c.judge_scores(recovered["id"]) + c.judge_scores(hung["id"]):
        assert row["judge_backend"] == "ollama" and row["judge_digest"], row
    assert all(r["error_kind"] for r in c.judge_scores(hung["id"]))
    # Unreachable before any item: the job fails at once with a reason that names the server.
    assert refused["status"] == "failed" and "127.0.0.1" in refused["error"], refused["error"]
    assert "Traceback" not in refused["error"]

    ev = c.wait(c.submit_evaluate({"classify_job_ids": [cj["id"]], "bootstrap": 50, "report": False,
                                   "judge_job_ids": [hung["id"], failed["id"], died["id"]]})["id"], timeout=120)
    assert ev["status"] == "succeeded", ev["error"]
    assert ev["result"]["accuracy"]


# ---------------------------------------------------------------- training killed midway

@pytest.mark.slow
def test_worker_killed_during_training_resumes_from_its_checkpoint_and_registers_once(rel_stack_factory,
                                                                                      tiny_model_dir, tmp_path,
                                                                                      rel_db_url):
    st = rel_stack_factory()
    st.start_api()
    st.start_worker()
    c = st.client()
    labels = ["World", "Sports", "Business", "Sci/Tech"]
    src = tmp_path / "news.jsonl"
    src.write_text("\n".join(json.dumps({"text": f"{t} (story {i})", "label": labels[i % 4]})
                             for i, t in enumerate(it["text"] for it in _news_items(120))))
    prep = c.wait(c.submit_prep({"train": {"path": str(src)}, "test": None, "validation_fraction": 0.1})["id"],
                  timeout=120)
    assert prep["status"] == "succeeded", prep["error"]
    spec = {"dataset_id": prep["result"]["dataset_id"], "model": str(tiny_model_dir), "max_steps": 60,
            "save_every": 5, "eval_every": 1000, "val_samples": 8, "batch_size": 4, "max_seq_len": 128,
            "warmup_steps": 0, "dtype": "fp32", "device": "cpu"}
    job = c.submit_train(spec)
    deadline = time.monotonic() + 180
    while True:  # kill after a few checkpoints, well before the end
        j = c.get(job["id"])
        step = (j.get("progress_info") or {}).get("done") or 0
        if step >= 15:
            break
        assert time.monotonic() < deadline and j["status"] in ("queued", "running"), (j["error"], j["status"])
        time.sleep(0.1)
    st.kill("worker")  # SIGKILL
    assert c.get(job["id"])["progress"] < 1.0
    st.start_worker("worker2")
    done = c.wait(job["id"], timeout=240)
    assert done["status"] == "succeeded", (done["error"], st.log("worker2")[-3000:])
    assert done["attempts"] == 2
    resumed = done["result"]["resumed_from_step"]
    assert resumed is not None and resumed >= 10 and resumed % 5 == 0, done["result"]
    msgs = _messages(c, job["id"])
    assert any(m.startswith(f"train: resumed from step {resumed}") for m in msgs), msgs
    assert msgs.count("succeeded") == 1
    assert _count(rel_db_url, f"SELECT count(*) FROM model_artifacts WHERE job_id = {job['id']}") == 1
    assert _count(rel_db_url, "SELECT count(*) FROM model_artifacts") == 1
    assert [m["id"] for m in c.models()] == [done["result"]["adapter_id"]]
