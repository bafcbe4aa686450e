"""Celery glue: one thin task per kind of job, the pipeline tasks, and the worker's signals.

A task takes a job id and hands it to `workers.jobs.runner.run_job` with the kind's handler
(`workers.jobs.handlers`), which loads the row, calls the plain function and records the outcome.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from celery.signals import worker_process_init, worker_ready

from broker.app import ADVANCE_PIPELINE, TASK_NAMES, app
from core.settings import get_settings
from db.session import init_db
from workers.jobs import pipeline, shards
from workers.jobs.handlers import HANDLERS
from workers.jobs.runner import requeue_stale_jobs, run_job

log = logging.getLogger("newslora.tasks")

__all__ = ["HANDLERS", "run_pipeline", "advance_pipeline", *(f"run_{kind}" for kind in HANDLERS)]


def _make_task(kind: str) -> Callable[[int], str]:
    def task(job_id: int) -> str:
        return run_job(job_id, kind, HANDLERS[kind])
    task.__name__ = f"run_{kind}"
    return app.task(name=TASK_NAMES[kind], acks_late=True)(task)


for _kind in HANDLERS:
    globals()[f"run_{_kind}"] = _make_task(_kind)


@app.task(name=TASK_NAMES["pipeline"], acks_late=True)
def run_pipeline(job_id: int) -> str:
    return pipeline.advance(job_id)


@app.task(name=ADVANCE_PIPELINE, acks_late=True)
def advance_pipeline(job_id: int) -> str:
    """A child of a pipeline, or a shard of a sharded classify job, ended: move its parent on."""
    return shards.advance(job_id) or pipeline.advance(job_id)


@worker_process_init.connect
def _on_worker_process_init(**_: Any) -> None:
    """Apply NEWSLORA_TORCH_THREADS in each worker process before it runs a job."""
    threads = get_settings().torch_threads
    if threads:
        import torch  # lazy: only a worker that caps torch's threads loads torch at start
        torch.set_num_threads(threads)


@worker_ready.connect
def _on_worker_ready(**_: Any) -> None:
    """Migrate the store, then re-queue jobs whose worker died (and keep doing so)."""
    init_db()

    def reap() -> None:
        while True:
            try:
                requeue_stale_jobs()
            except Exception as e:  # noqa: BLE001
                log.warning("reaper: %s", e)
            time.sleep(max(2.0, get_settings().lease_s))
    threading.Thread(target=reap, name="reaper", daemon=True).start()
