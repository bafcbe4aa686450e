"""Store queries on SQLite and PostgreSQL: leases, transitions, cancel, idempotency, upserts."""
from __future__ import annotations

import time

import pytest

from db import jobs as jobq
from db import results as resq
from db.session import session_scope


def _job(url, **kw):
    with session_scope(url) as s:
        return jobq.create_job(session=s, kind="noop", queue="cpu", spec={}, **kw).id


def test_claim_is_exclusive_and_dead_worker_is_taken_over(store_url):
    job_id = _job(store_url)
    with session_scope(store_url) as s:
        assert jobq.claim(job_id, "w1", session=s, lease_s=0.5) == "claimed"
    with session_scope(store_url) as s:  # a second delivery while w1 is alive: dropped
        assert jobq.claim(job_id, "w2", session=s, lease_s=0.5) == "busy"
    time.sleep(0.7)  # w1 stops renewing: its lease runs out
    with session_scope(store_url) as s:
        assert [j.id for j in jobq.stale_running_jobs(session=s)] == [job_id]
        assert jobq.claim(job_id, "w2", session=s, lease_s=5) == "taken_over"
    with session_scope(store_url) as s:
        ours, cancel = jobq.renew_lease(job_id, "w1", session=s, lease_s=5)
        assert (ours, cancel) == (False, False)  # w1 learns it lost the job
        assert jobq.finish(job_id, "succeeded", session=s, worker="w1") is False
        assert jobq.finish(job_id, "succeeded", session=s, worker="w2", result={"x": 1}) is True
        assert jobq.finish(job_id, "failed", session=s) is False  # terminal states are final
    with session_scope(store_url) as s:
        job = jobq.get_job(job_id, session=s)
        assert (job.status, job.attempts, job.result) == ("succeeded", 2, {"x": 1})
        msgs = [e.message for e in jobq.events(job_id, session=s)]
        assert msgs == ["queued", "running", "taken over after its worker died", "succeeded"]
        assert jobq.claim(job_id, "w3", session=s, lease_s=5) == "finished"


def test_cancel_queued_running_and_finished(store_url):
    queued, running = _job(store_url), _job(store_url)
    with session_scope(store_url) as s:
        jobq.claim(running, "w1", session=s, lease_s=30)
    with session_scope(store_url) as s:
        assert jobq.request_cancel(queued, session=s).status == "cancelled"
        assert jobq.request_cancel(running, session=s).status == "running"
    with session_scope(store_url) as s:
        assert jobq.renew_lease(running, "w1", session=s, lease_s=30) == (True, True)
        jobq.finish(running, "cancelled", session=s, worker="w1")
    with session_scope(store_url) as s, pytest.raises(jobq.JobStateConflict):
        jobq.request_cancel(running, session=s)
    with session_scope(store_url) as s, pytest.raises(jobq.JobNotFound):
        jobq.request_cancel(999_999, session=s)


def test_cancel_reaches_children(store_url):
    parent = _job(store_url)
    child = _job(store_url, parent_id=parent)
    with session_scope(store_url) as s:
        jobq.claim(parent, "w", session=s, lease_s=30)
        jobq.request_cancel(parent, session=s)
    with session_scope(store_url) as s:
        assert jobq.get_job(child, session=s).status == "cancelled"


def test_idempotency_key_is_unique(store_url):
    from sqlalchemy.exc import IntegrityError
    _job(store_url, idempotency_key="k1")
    with pytest.raises(IntegrityError):
        _job(store_url, idempotency_key="k1")
    with session_scope(store_url) as s:
        assert jobq.find_by_idempotency_key("k1", session=s) is not None


def test_predictions_upsert_stores_each_item_once(store_url):
    job_id = _job(store_url)
    rows = [{"item_id": f"i{n}", "label": "World", "probs": {"World": 0.9}, "seq": n} for n in range(1200)]
    with session_scope(store_url) as s:
        resq.save_predictions(job_id, rows[:700], session=s)
    with session_scope(store_url) as s:  # a re-delivered job writes the overlap again
        resq.save_predictions(job_id, [dict(r, label="Sports") for r in rows[500:]], session=s)
    with session_scope(store_url) as s:
        page, total = resq.predictions(job_id, session=s, limit=5000)
        assert total == 1200 and len({p.item_id for p in page}) == 1200
        assert page[0].label == "World" and page[600].label == "Sports"
        assert resq.done_item_ids(job_id, session=s) == {f"i{n}" for n in range(1200)}


def test_list_filters_and_paginates(store_url):
    ids = [_job(store_url) for _ in range(5)]
    with session_scope(store_url) as s:
        jobq.claim(ids[0], "w", session=s, lease_s=30)
        rows, total = jobq.list_jobs(session=s, kind="noop", status="queued", limit=2, offset=1)
        assert total == 4 and [r.id for r in rows] == [ids[3], ids[2]]
