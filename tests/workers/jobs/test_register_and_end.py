"""A job's registration and its end are one transaction (found by the soak, issue #27).

The 10-minute soak (seed 1) ended an evaluate job `cancelled` with its evaluation registered: its worker had
registered the evaluation and died before it recorded the job's end; a cancel arrived; the re-delivered job
ran again, saw the cancel and ended `cancelled`, leaving the first run's row (a registered row of a job that
did not succeed). A re-run of a prep job was worse: it removes its own folder first, so a cancel on the re-run
left a registered dataset without its folder. Now `StoreContext.register` ends the job `succeeded` in the
transaction that registers the row: the worker can die only before both or after both.

The worker's death between the two is the runner's `_finish` raising instead of recording (a SIGKILL leaves
the job `running` with its lease held, as this does); the re-delivery is `run_job` once the lease ran out.
The other tests: psycopg's server-side prepared statements are off (the soak's second finding: a write after a
PostgreSQL restart failed with `InvalidSqlStatementName: prepared statement "_pg3_2" does not exist`).
"""
from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text, update

import workers.jobs.runner as runner
from db import jobs as jobq
from db.models import Dataset, Job, utcnow
from db.session import get_engine, session_scope
from tests.workers.jobs.conftest import make_prep_job
from workers.jobs.handlers import HANDLERS
from workers.jobs.runner import run_job


class Killed(BaseException):
    """The worker's process dying (nothing after it runs, not even an `except Exception`)."""


@pytest.fixture
def store(newslora_home, store_url, monkeypatch):
    from core.settings import reset_settings
    monkeypatch.setenv("DATABASE_URL", store_url)
    monkeypatch.setenv("NEWSLORA_HEARTBEAT_S", "0.05")
    reset_settings()
    yield newslora_home
    get_engine.cache_clear()


def test_a_worker_that_dies_after_registering_leaves_its_job_succeeded_not_rerun(store, tmp_path, monkeypatch):
    job_id = make_prep_job(tmp_path)

    def killed(*args, **kwargs):
        raise Killed()
    with monkeypatch.context() as m:
        m.setattr(runner, "_finish", killed)
        try:
            run_job(job_id, "prep", HANDLERS["prep"], worker="first")
        except Killed:
            pass  # died before recording the job's end (before the fix, the dataset was registered by now)

    with session_scope() as s:  # a user cancels it; its lease runs out
        try:
            jobq.request_cancel(job_id, session=s)
        except jobq.JobStateConflict:
            pass  # it had ended already
    with session_scope() as s:
        s.execute(update(Job).where(Job.id == job_id, Job.status == "running")
                  .values(lease_expires_at=utcnow() - timedelta(seconds=1)))

    def slow_prep(job, spec, ctx):  # long enough for the heartbeat to see the cancel
        time.sleep(0.5)
        return HANDLERS["prep"](job, spec, ctx)
    run_job(job_id, "prep", slow_prep, worker="second")  # the re-delivery

    with session_scope() as s:
        job = s.get(Job, job_id)
        rows = s.scalars(select(Dataset).where(Dataset.job_id == job_id)).all()
        assert (job.status, len(rows)) == ("succeeded", 1), (job.status, job.error, [r.id for r in rows])
        assert job.result["dataset_id"] == rows[0].id and job.lease_owner == "first"
        assert Path(rows[0].path).is_dir() and (Path(rows[0].path) / "meta.json").is_file()
        ends = [e for e in jobq.events(job_id, session=s) if (e.metrics or {}).get("status")]
        assert [e.metrics["status"] for e in ends] == ["succeeded"]


def test_a_registration_that_finds_another_worker_holding_the_job_registers_nothing(store, tmp_path):
    job_id = make_prep_job(tmp_path)

    def prep_after_takeover(job, spec, ctx):
        with session_scope() as s:  # presumed dead meanwhile; another worker took the job over
            s.execute(update(Job).where(Job.id == job.id).values(lease_owner="other"))
        return HANDLERS["prep"](job, spec, ctx)
    assert run_job(job_id, "prep", prep_after_takeover, worker="first") == "lease_lost"
    with session_scope() as s:
        assert s.get(Job, job_id).status == "running"
        assert s.scalars(select(Dataset)).all() == []


def test_postgresql_connections_prepare_no_statements(store, store_url):
    if not store_url.startswith("postgresql"):
        pytest.skip("server-side prepared statements are PostgreSQL's")
    with get_engine().connect() as c:
        for i in range(10):  # psycopg prepares a statement on its fifth run by default
            c.execute(text("SELECT count(*) FROM jobs WHERE id > :i"), {"i": i})
        assert c.execute(text("SELECT count(*) FROM pg_prepared_statements")).scalar() == 0
