"""Running one job on a worker: lease, heartbeat, cancel, time limit, and the terminal transition.

`run_job(job_id, kind, handler)` is what every thin Celery task calls. It claims the job row's lease
(a second delivery of a job whose worker is alive is dropped; a dead worker's job is taken over),
renews the lease from a heartbeat thread that also notices cancel requests, calls the handler with a
`StoreContext`, and records succeeded / failed / cancelled with an event.
"""
from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

from celery.exceptions import SoftTimeLimitExceeded
from kombu.exceptions import OperationalError as BrokerUnavailable
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session

import broker.app  # called as broker.app.enqueue...: one name for tests to stub
from core.context import JobCancelled
from core.contracts.judge import JudgeRow
from core.contracts.prediction import PredictionRow
from core.settings import get_settings
from core.specs import parse_spec
from db import jobs as jobq
from db import results as resq
from db.models import Job
from db.session import StoreUnavailable, session_scope
from workers.jobs.shards import ShardsPending, is_shard, roll_up

log = logging.getLogger("newslora.worker")


def is_store_down(e: object) -> bool:
    """Whether a store error means the database is unreachable (a restart), not a bad statement: refused or
    dropped connections (OperationalError); psycopg's "unexpected result EMPTY_QUERY from command 'COMMIT'" on a
    connection cut mid-commit (InterfaceError); and its "can't change 'autocommit' now: connection in
    transaction status INTRANS" on a pooled connection the restart left mid-transaction (ProgrammingError)."""
    if isinstance(e, (OperationalError, InterfaceError)):
        return True
    return isinstance(e, ProgrammingError) and "can't change 'autocommit' now" in str(e)


_WORKER_IDS: dict[int, str] = {}


def worker_id() -> str:
    """This process's identity as a lease holder (per pid: prefork children must not share one)."""
    pid = os.getpid()
    if pid not in _WORKER_IDS:
        _WORKER_IDS[pid] = f"{socket.gethostname()}:{pid}:{uuid.uuid4().hex[:8]}"
    return _WORKER_IDS[pid]


class LeaseLost(RuntimeError):
    """Another worker took the job over (this one was presumed dead): stop without recording anything."""


class JobTimedOut(RuntimeError):
    pass


def _backoff(attempt: int) -> None:
    """The wait before the next try of a write, a handler or a job's end while the store or broker is down."""
    time.sleep(min(5.0, 0.5 * (attempt + 1)))


def _with_store_retries(job_id: int, what: str, fn: Callable[[], Any]) -> Any:
    """Run one store write, retrying while the database is unreachable (a restart), boundedly.

    Raises:
        db.session.StoreUnavailable: still unreachable after NEWSLORA_WAIT_RETRIES tries.
    """
    retries = max(1, get_settings().wait_retries)
    for attempt in range(retries):
        try:
            return fn()
        except DBAPIError as e:
            if not is_store_down(e):
                raise
            log.warning("job %s: the database is unavailable while writing %s (try %d/%d): %s", job_id, what,
                        attempt + 1, retries, type(e.orig or e).__name__)
            _backoff(attempt)
    raise StoreUnavailable(f"the database was unreachable for {retries} tries while the job wrote {what}; "
                           f"check that PostgreSQL is up, then resubmit")


def _run_through_store_outages(job: Job, spec: Any, ctx: "StoreContext", handler: Handler) -> Any:
    """Run the handler; where it fails because the database is unreachable (a read of its inputs during a
    PostgreSQL restart, found by the soak) or the broker is (a sharded classify job sending its shards while
    Redis restarts, found by the soak), run it again once they answer, boundedly. A handler is idempotent by
    job id (what it stored is skipped, training resumes from its checkpoint, a registration looks its row up
    first, shards already made are sent again, not made again), as a re-delivered job's is.

    Raises:
        sqlalchemy.exc.DBAPIError, kombu.exceptions.OperationalError: still unreachable after
            NEWSLORA_WAIT_RETRIES runs (or a bad statement).
    """
    retries = max(1, get_settings().wait_retries)
    for attempt in range(retries):
        try:
            return handler(job, spec, ctx)
        except (DBAPIError, BrokerUnavailable) as e:
            if (isinstance(e, DBAPIError) and not is_store_down(e)) or attempt == retries - 1:
                raise
            what = "database" if isinstance(e, DBAPIError) else "broker"
            log.warning("job %s: the %s is unavailable (%s); running the job again (try %d/%d)", job.id, what,
                        type(getattr(e, "orig", None) or e).__name__, attempt + 2, retries)
            _backoff(attempt)
            ctx.event(f"the {what} was unavailable: running the job again from what it stored")


class StoreContext:
    """The JobContext a worker hands to plain job functions: events, progress, cancel, predictions."""

    def __init__(self, job_id: int, worker: str, work_dir: Path, *, time_limit_s: float):
        s = get_settings()
        self.job_id = job_id
        self.work_dir = work_dir
        self._worker = worker
        self._lease_s = s.lease_s
        self._heartbeat_s = s.heartbeat_s
        self._deadline = time.monotonic() + time_limit_s
        self._time_limit_s = time_limit_s
        self._cancel = threading.Event()
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._last_progress_write = 0.0
        self._last_progress_event = 0.0
        self.finished = False  # ended `succeeded` by `register`, with what it registered
        self.shard_parent: int | None = None  # a shard of a sharded classify job: its progress rolls up there
        self._thread = threading.Thread(target=self._heartbeat, name=f"heartbeat-{job_id}", daemon=True)

    # -- lifecycle
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self._heartbeat_s):
            try:
                with session_scope() as s:
                    ours, cancel = jobq.renew_lease(self.job_id, self._worker, session=s, lease_s=self._lease_s)
                if not ours:
                    self._lost.set()
                if cancel:
                    self._cancel.set()
            except Exception as e:  # noqa: BLE001 - the store may blink; keep working and retry
                log.warning("job %s: heartbeat failed (%s); retrying", self.job_id, type(e).__name__)

    # -- JobContext
    def event(self, message: str, *, level: str = "info", metrics: dict[str, Any] | None = None) -> None:
        def write() -> None:
            with session_scope() as s:
                jobq.add_event(self.job_id, message, session=s, level=level, metrics=_jsonable(metrics))
        _with_store_retries(self.job_id, "an event", write)

    def progress(self, done: float, total: float | None = None, *, message: str | None = None,
                 **metrics: Any) -> None:
        now = time.monotonic()
        final = total is not None and done >= total
        if not final and now - self._last_progress_write < 0.5:
            return
        self._last_progress_write = now
        frac = min(1.0, done / total) if total else 0.0
        info = _jsonable({"done": done, "total": total, "message": message, **metrics})
        with_event = final or now - self._last_progress_event >= 2.0

        def write() -> None:
            with session_scope() as s:
                if not jobq.set_progress(self.job_id, frac, info, session=s, active_only=True):
                    self._cancel.set()  # it ended under us (a cancel the heartbeat has not seen yet): no more
                    return              # progress or events after its end; stop at the next check
                if with_event:
                    jobq.add_event(self.job_id, message or "progress", session=s, metrics=info)
                if self.shard_parent is not None:
                    roll_up(self.shard_parent, session=s)
        _with_store_retries(self.job_id, "progress", write)
        if with_event:
            self._last_progress_event = now

    def register(self, what: str, fn: Callable[[Session], dict[str, Any]]) -> dict[str, Any]:
        """Register what the job made and end it `succeeded`, in one transaction: `fn(session)` adds the row
        (a dataset, an adapter, an evaluation, an export) and returns the job's result. A registered row
        without its job succeeded cannot exist, so a job re-delivered after its worker died between the two
        (then cancelled on its re-run: found by the soak, issue #27) never runs again: its claim finds it
        finished. Retried while the database restarts; `fn` looks its row up by job id first.

        Raises:
            LeaseLost: another worker holds the job now (nothing is registered; it registers its own).
            db.session.StoreUnavailable: still unreachable after NEWSLORA_WAIT_RETRIES tries.
        """
        def write() -> dict[str, Any]:
            with session_scope() as s:
                result = _jsonable(fn(s))
                if not jobq.finish(self.job_id, "succeeded", session=s, result=result, worker=self._worker):
                    job = s.get(Job, self.job_id)  # a retry of a commit that landed before the connection broke
                    if job is None or job.status != "succeeded" or job.lease_owner != self._worker:
                        raise LeaseLost(f"job {self.job_id}: another worker took it over before {what}")
                return result
        result = _with_store_retries(self.job_id, what, write)
        self.finished = True
        return result

    def check_lease(self) -> None:
        """Raise LeaseLost when another worker took the job over (this one was presumed dead)."""
        if self._lost.is_set():
            raise LeaseLost(f"job {self.job_id}: another worker took it over")

    def check_cancel(self) -> None:
        self.check_lease()
        if self._cancel.is_set():
            raise JobCancelled(f"job {self.job_id} cancelled")
        if time.monotonic() > self._deadline:
            raise JobTimedOut(f"exceeded its time limit of {self._time_limit_s:.0f} s")

    def save_predictions(self, rows: Sequence[PredictionRow]) -> None:
        if self._lost.is_set():
            raise LeaseLost(f"job {self.job_id}: another worker took it over")
        clean = [PredictionRow.model_validate(_jsonable(r) if isinstance(r, dict) else r) for r in rows]

        def write() -> None:  # an upsert: a retry after a half-sent write stores each item once
            with session_scope() as s:
                resq.save_predictions(self.job_id, clean, session=s)
        _with_store_retries(self.job_id, "predictions", write)

    def stored_predictions(self) -> list[PredictionRow]:
        def read() -> list[PredictionRow]:
            with session_scope() as s:
                return resq.prediction_rows(self.job_id, session=s)
        return _with_store_retries(self.job_id, "(reading) its stored predictions", read)

    def save_judge_rows(self, rows: Sequence[JudgeRow]) -> None:
        if self._lost.is_set():
            raise LeaseLost(f"job {self.job_id}: another worker took it over")
        clean = [JudgeRow.model_validate(_jsonable(r) if isinstance(r, dict) else r) for r in rows]

        def write() -> None:
            with session_scope() as s:
                resq.save_judge_scores(self.job_id, clean, session=s)
        _with_store_retries(self.job_id, "judge rows", write)

    def done_item_ids(self) -> set[str]:
        def read() -> set[str]:
            with session_scope() as s:
                return resq.done_item_ids(self.job_id, session=s)
        return _with_store_retries(self.job_id, "(reading) its stored items", read)


def _jsonable(obj: Any) -> Any:
    """Plain JSON types only (numpy/torch scalars become floats; NaN becomes None)."""
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return _jsonable(obj.item())
    return str(obj)


Handler = Callable[[Job, Any, StoreContext], dict[str, Any]]


def run_job(job_id: int, kind: str, handler: Handler, *, worker: str | None = None) -> str:
    """Claim, run and record one job. Returns the outcome ('succeeded', 'failed', 'cancelled',
    or why it was not run: 'busy', 'finished', 'missing', 'lease_lost')."""
    s = get_settings()
    worker = worker or worker_id()

    def claim() -> tuple[str, Job | None]:
        with session_scope() as session:
            return (jobq.claim(job_id, worker, session=session, lease_s=s.lease_s), session.get(Job, job_id))
    # A delivery that arrives while the database restarts waits for it (boundedly) rather than being
    # acked and lost with the job left queued.
    outcome, job = _with_store_retries(job_id, "its lease", claim)
    if outcome not in ("claimed", "taken_over"):
        log.info("job %s: delivery dropped (%s)", job_id, outcome)
        if outcome == "cancelled":
            _notify_parent(job)
        return outcome
    if job.kind != kind:
        _finish(job, "failed", error=f"job {job_id} is a {job.kind} job but was delivered to the {kind} task")
        return "failed"
    work_dir = s.path("jobs", str(job_id))
    ctx = StoreContext(job_id, worker, work_dir, time_limit_s=s.job_time_limit_s)
    ctx.start()
    ctx.shard_parent = job.parent_id if is_shard(job) else None
    try:
        spec = parse_spec(kind, job.spec)
        result = _run_through_store_outages(job, spec, ctx, handler)
        # A lost lease during the last step still counts; a cancel does not: the handler has written what it
        # made, and a cancelled job must not leave a registered artifact (nor an unregistered folder). A job
        # that registered something has ended already (`StoreContext.register`).
        if not ctx.finished:
            ctx.check_lease()
        status, error, result = "succeeded", None, _jsonable(result or {})
    except JobCancelled:
        status, error, result = "cancelled", None, None
    except LeaseLost:
        log.warning("job %s: lease lost to another worker; stopping without recording", job_id)
        return "lease_lost"
    except ShardsPending as e:  # the job stays running; its shards roll up into it and finish it
        log.info("%s", e)
        broker.app.enqueue_advance(job_id)  # a re-run whose shards had all ended is finished at once
        return "sharded"
    except Exception as e:  # noqa: BLE001 - every failure is recorded on the row, with its reason
        if isinstance(e, SoftTimeLimitExceeded):
            error = f"exceeded its time limit of {s.job_time_limit_s} s"
        else:
            error = f"{type(e).__name__}: {e}" if not isinstance(e, JobTimedOut) else str(e)
        log.exception("job %s failed", job_id)
        status, result = "failed", None
    finally:
        ctx.stop()
    if ctx.finished:  # recorded with its registration
        _notify_parent(job)
    else:
        _finish(job, status, error=error, result=result, worker=worker)
    return status


def _finish(job: Job, status: str, *, error: str | None = None, result: dict[str, Any] | None = None,
            worker: str | None = None) -> None:
    for attempt in range(get_settings().wait_retries):
        try:
            with session_scope() as s:
                jobq.finish(job.id, status, session=s, error=error, result=result, worker=worker)
            break
        except Exception as e:  # noqa: BLE001 - keep the outcome: retry while the store is down
            log.warning("job %s: could not record %s (%s); retrying", job.id, status, type(e).__name__)
            _backoff(attempt)
    _notify_parent(job)


def _notify_parent(job: Job | None) -> None:
    if job is None or job.parent_id is None:
        return
    try:
        broker.app.enqueue_advance(job.parent_id)
    except Exception as e:  # noqa: BLE001 - the reaper advances stuck pipelines later
        log.warning("job %s: could not notify pipeline %s (%s)", job.id, job.parent_id, e)


def requeue_stale_jobs() -> list[int]:
    """Re-send the tasks of running jobs whose lease expired (their worker died). Transports that never
    re-deliver an unacked message (the embedded one) rely on this; with Redis it is a second safety net."""
    with session_scope() as s:
        stale = [(j.id, j.kind, j.queue) for j in jobq.stale_running_jobs(session=s)]
        lost = [(j.id, j.kind, j.queue) for j in jobq.stale_queued_jobs(
            session=s, older_than_s=get_settings().requeue_queued_after_s)]
    for job_id, kind, queue in lost:  # a duplicate of a message that was not lost is dropped by the lease
        log.warning("job %s: queued for over %.0f s; re-sending its message in case the broker lost it", job_id,
                    get_settings().requeue_queued_after_s)
        broker.app.enqueue(job_id, kind, queue)
    for job_id, kind, queue in stale:
        if kind == "pipeline":  # nobody advanced it for a lease (a lost message, a cancel no child reports)
            log.debug("pipeline %s: no progress within its lease; advancing it again", job_id)
        else:
            log.warning("job %s: its worker stopped renewing the lease; re-queueing", job_id)
        broker.app.enqueue(job_id, kind, queue)
    return [j for j, _, _ in stale + lost]
