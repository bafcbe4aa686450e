"""Faults against real processes: workers killed, Redis and PostgreSQL restarted, judge server failing,
time limits, and Redis re-delivery of a job that outlives the visibility timeout.

Redis and PostgreSQL here are this package's own servers on free ports (see conftest.py); the
machine's shared services are never restarted.
"""
from __future__ import annotations

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
    for d in done:
        assert d["status"] in ("succeeded", "failed"), d
        if d["status"] == "failed":  # allowed, but only with a clear reason
            assert d["error"] and "database" in d["error"].lower(), d["error"]
    assert done[-1]["status"] == "succeeded", st.log("worker")[-4000:]
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
    from broker.settings import Settings
    assert Settings().visibility_timeout_s > Settings().job_time_limit_s  # the defaults agree
    assert Settings(NEWSLORA_VISIBILITY_TIMEOUT_S=25200, NEWSLORA_JOB_TIME_LIMIT_S=21600).redelivery_warning() is None
    warning = Settings(NEWSLORA_VISIBILITY_TIMEOUT_S=3600, NEWSLORA_JOB_TIME_LIMIT_S=21600).redelivery_warning()
    assert "3600" in warning and "21600" in warning and "above the time limit" in warning
