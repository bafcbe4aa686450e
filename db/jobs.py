"""Queries on jobs and their events. Each takes the session as a keyword; the caller commits."""
from __future__ import annotations

from datetime import timedelta
from typing import Any, Sequence

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db.models import TERMINAL, Job, JobEvent, utcnow


class JobNotFound(LookupError):
    pass


class JobStateConflict(RuntimeError):
    """The job is not in a state that allows the operation (e.g. cancel of a finished job)."""


def create_job(*, session: Session, kind: str, queue: str, spec: dict[str, Any], parent_id: int | None = None,
               idempotency_key: str | None = None, code_version: str | None = None,
               owner_id: int | None = None) -> Job:
    """A queued job (and its first event). A child job (parent_id) belongs to its parent's owner."""
    if parent_id is not None and owner_id is None:
        owner_id = session.scalar(select(Job.owner_id).where(Job.id == parent_id))
    job = Job(kind=kind, queue=queue, spec=spec, status="queued", parent_id=parent_id,
              idempotency_key=idempotency_key, code_version=code_version, owner_id=owner_id)
    session.add(job)
    session.flush()
    session.add(JobEvent(job_id=job.id, level="info", message="queued", metrics={"queue": queue}))
    return job


def get_job(job_id: int, *, session: Session) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFound(f"no job with id {job_id}")
    return job


def find_by_idempotency_key(key: str, *, session: Session) -> Job | None:
    return session.scalar(select(Job).where(Job.idempotency_key == key))


def list_jobs(*, session: Session, kind: str | None = None, status: str | None = None,
              parent_id: int | None = None, limit: int = 50, offset: int = 0,
              owner_id: int | None = None) -> tuple[Sequence[Job], int]:
    """A page of jobs, newest first, and the total; `owner_id` keeps one owner's jobs only."""
    q = select(Job)
    if owner_id is not None:
        q = q.where(Job.owner_id == owner_id)
    if kind:
        q = q.where(Job.kind == kind)
    if status:
        q = q.where(Job.status == status)
    if parent_id is not None:
        q = q.where(Job.parent_id == parent_id)
    total = session.scalar(select(func.count()).select_from(q.subquery())) or 0
    rows = session.scalars(q.order_by(Job.id.desc()).limit(limit).offset(offset)).all()
    return rows, total


def children(job_id: int, *, session: Session) -> Sequence[Job]:
    return session.scalars(select(Job).where(Job.parent_id == job_id).order_by(Job.id)).all()


def add_event(job_id: int, message: str, *, session: Session, level: str = "info",
              metrics: dict[str, Any] | None = None) -> None:
    session.add(JobEvent(job_id=job_id, level=level, message=message, metrics=metrics))


def events(job_id: int, *, session: Session, after_id: int = 0, limit: int = 200) -> Sequence[JobEvent]:
    return session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after_id)
                           .order_by(JobEvent.id).limit(limit)).all()


def claim(job_id: int, worker: str, *, session: Session, lease_s: float) -> str:
    """Take the job's lease. Returns 'claimed', 'taken_over' (a dead worker's job), 'busy' (a live
    worker holds it: drop this delivery), 'finished', 'cancelled' (was cancelled while queued) or 'missing'."""
    now = utcnow()
    until = now + timedelta(seconds=lease_s)
    job = session.get(Job, job_id)
    if job is None:
        return "missing"
    if job.status in TERMINAL:
        return "finished"
    if job.cancel_requested and job.status == "queued":
        finish(job_id, "cancelled", session=session, error=None, message="cancelled before it started")
        return "cancelled"
    was_running = job.status == "running"
    res = session.execute(
        update(Job).where(Job.id == job_id,
                          ((Job.status == "queued") |
                           ((Job.status == "running") & ((Job.lease_expires_at.is_(None)) |
                                                          (Job.lease_expires_at < now)))))
        .values(status="running", lease_owner=worker, lease_expires_at=until, attempts=Job.attempts + 1,
                started_at=func.coalesce(Job.started_at, now), updated_at=now)
        .execution_options(synchronize_session=False))
    if res.rowcount != 1:
        return "busy"
    add_event(job_id, "taken over after its worker died" if was_running else "running", session=session,
              level="warning" if was_running else "info", metrics={"worker": worker})
    return "taken_over" if was_running else "claimed"


def renew_lease(job_id: int, worker: str, *, session: Session, lease_s: float) -> tuple[bool, bool]:
    """Extend the lease. Returns (still ours, cancel requested)."""
    now = utcnow()
    res = session.execute(update(Job).where(Job.id == job_id, Job.lease_owner == worker, Job.status == "running")
                          .values(lease_expires_at=now + timedelta(seconds=lease_s))
                          .execution_options(synchronize_session=False))
    cancel = session.scalar(select(Job.cancel_requested).where(Job.id == job_id))
    return res.rowcount == 1, bool(cancel)


def set_progress(job_id: int, progress: float, info: dict[str, Any], *, session: Session,
                 active_only: bool = False) -> bool:
    """Store the job's progress. With `active_only`, only while it has not ended: False when it had (a cancel
    that landed meanwhile; the UPDATE takes the row's lock, so it sees a cancel committed before it)."""
    q = update(Job).where(Job.id == job_id)
    if active_only:
        q = q.where(Job.status.notin_(TERMINAL))
    done = session.execute(q.values(progress=progress, progress_info=info, updated_at=utcnow())
                           .execution_options(synchronize_session=False))
    return done.rowcount > 0


def finish(job_id: int, status: str, *, session: Session, result: dict[str, Any] | None = None,
           error: str | None = None, message: str | None = None, worker: str | None = None) -> bool:
    """Record a terminal state once. With `worker`, only the lease holder may finish the job."""
    assert status in TERMINAL
    now = utcnow()
    q = update(Job).where(Job.id == job_id, Job.status.notin_(TERMINAL))
    if worker is not None:
        q = q.where(Job.lease_owner == worker)
    values: dict[str, Any] = dict(status=status, error=error, finished_at=now, updated_at=now,
                                  lease_expires_at=None)
    if result is not None:
        values["result"] = result
    if status == "succeeded":
        values["progress"] = 1.0
    res = session.execute(q.values(**values).execution_options(synchronize_session=False))
    if res.rowcount == 1:
        add_event(job_id, message or status, session=session,
                  level="error" if status == "failed" else "info",
                  metrics={"status": status, **({"error": error} if error else {})})
        return True
    return False


def request_cancel(job_id: int, *, session: Session) -> Job:
    """Cancel a queued job at once; ask a running one to stop at its next step boundary.

    Raises:
        JobNotFound, JobStateConflict (the job already finished).
    """
    job = get_job(job_id, session=session)
    if job.status in TERMINAL:
        raise JobStateConflict(f"job {job_id} already {job.status}; only queued or running jobs can be cancelled")
    session.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True, updated_at=utcnow())
                    .execution_options(synchronize_session=False))
    if job.status == "queued":
        finish(job_id, "cancelled", session=session, message="cancelled while queued")
    else:
        add_event(job_id, "cancel requested", session=session)
    for child in children(job_id, session=session):
        if child.status not in TERMINAL:
            request_cancel(child.id, session=session)
    session.refresh(job)
    return job


def stale_queued_jobs(*, session: Session, older_than_s: float) -> Sequence[Job]:
    """Queued jobs untouched for `older_than_s`: their message may have been lost (a broker killed before
    it wrote the message to disk). Each is touched, so it is re-sent at most once per period."""
    jobs = session.scalars(select(Job).where(Job.status == "queued",
                                             Job.updated_at < utcnow() - timedelta(seconds=older_than_s))).all()
    for j in jobs:
        j.updated_at = utcnow()
    return jobs


def stale_running_jobs(*, session: Session) -> Sequence[Job]:
    """Running jobs whose lease ran out: their worker died."""
    return session.scalars(select(Job).where(Job.status == "running", Job.lease_expires_at < utcnow())).all()
