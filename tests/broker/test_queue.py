"""Real Celery workers on real Redis and PostgreSQL, driven through the real API and client."""
from __future__ import annotations

import time

import pytest

from tests.conftest import wait_status

pytestmark = [pytest.mark.redis, pytest.mark.postgres]


def test_job_runs_on_a_worker_and_is_read_back(redis_pg_stack):
    c = redis_pg_stack.client()
    seen = []
    job = c.submit_noop(steps=5, sleep_s=0.05)
    done = c.wait(job["id"], timeout=60, progress=lambda j: seen.append(j["status"]))
    assert done["status"] == "succeeded", redis_pg_stack.log("worker")[-3000:]
    assert done["result"] == {"steps": 5} and done["progress"] == 1.0 and done["attempts"] == 1
    msgs = [e["message"] for e in c.events(job["id"])]
    assert msgs[:2] == ["queued", "running"] and msgs[-1] == "succeeded" and "step" in msgs
    assert seen[-1] == "succeeded"


def test_failed_job_records_its_error(redis_pg_stack):
    c = redis_pg_stack.client()
    job = c.wait(c.submit_noop(fail=True)["id"], timeout=60)
    assert job["status"] == "failed" and job["error"] == "RuntimeError: noop job asked to fail"
    assert c.events(job["id"])[-1]["level"] == "error"


def test_cancel_a_queued_and_a_running_job(redis_pg_stack):
    c = redis_pg_stack.client()
    running = c.submit_noop(steps=400, sleep_s=0.05)
    wait_status(c, running["id"], ("running",))
    queued = c.submit_noop(steps=1)  # the only worker slot is busy: this one waits in the queue
    assert c.get(queued["id"])["status"] == "queued"
    assert c.cancel(queued["id"])["status"] == "cancelled"
    assert c.cancel(running["id"])["status"] == "running"  # stops at its next step boundary
    job = wait_status(c, running["id"], ("cancelled", "succeeded", "failed"), timeout=30)
    assert job["status"] == "cancelled" and job["progress"] < 1.0
    # The cancelled queued job's message is dropped by the worker, not run.
    time.sleep(1.0)
    assert c.get(queued["id"])["status"] == "cancelled" and c.get(queued["id"])["attempts"] == 0


def test_idempotency_key_gives_one_job(redis_pg_stack):
    c = redis_pg_stack.client()
    ids = {c.submit("noop", {"steps": 1}, idempotency_key="nightly-1")["id"] for _ in range(3)}
    assert len(ids) == 1
    assert c.wait(ids.pop(), timeout=60)["status"] == "succeeded"
    assert c.list(kind="noop")["total"] == 1


def test_worker_killed_mid_task_job_is_redelivered_and_finished_once(redis_pg_stack):
    st = redis_pg_stack
    c = st.client()
    job = c.submit_noop(steps=30, sleep_s=0.2)
    wait_status(c, job["id"], ("running",))
    time.sleep(1.0)
    st.kill("worker")  # SIGKILL to the whole worker: no ack, no clean shutdown
    assert c.get(job["id"])["status"] == "running"
    st.start_worker("worker2")
    done = c.wait(job["id"], timeout=90)
    assert done["status"] == "succeeded", st.log("worker2")[-3000:]
    assert done["attempts"] == 2
    msgs = [e["message"] for e in c.events(job["id"], limit=1000)]
    assert msgs.count("succeeded") == 1 and "taken over after its worker died" in msgs
    # Any later re-delivery of the same message is dropped: still finished once.
    time.sleep(6)
    again = c.get(job["id"])
    assert again["status"] == "succeeded" and again["attempts"] == 2
