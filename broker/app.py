"""The one Celery app and its routing table.

Queues: `cpu` (data prep, judging, metrics, pipeline steps) and `gpu` (training, batched inference).
JSON only on the wire (no pickle). Every task is acks_late with prefetch 1 and idempotent by job id:
the job row's lease (see workers/jobs/runner.py) makes a second delivery harmless.
"""
from __future__ import annotations

import logging
import os

from celery import Celery
from kombu import Queue
from kombu.exceptions import OperationalError as BrokerUnavailable

from core.settings import get_settings
from core.specs import QUEUES

# Task name per job kind; the queue comes from core.specs.QUEUES.
TASK_NAMES: dict[str, str] = {kind: f"newslora.{kind}" for kind in QUEUES}
ADVANCE_PIPELINE = "newslora.advance_pipeline"
ROUTES: dict[str, dict[str, str]] = {TASK_NAMES[k]: {"queue": q} for k, q in QUEUES.items()}
ROUTES[ADVANCE_PIPELINE] = {"queue": "cpu"}


def create_app() -> Celery:
    s = get_settings()
    if s.resolved_broker_url.startswith(("redis://", "rediss://")) and s.redelivery_warning():
        logging.getLogger("newslora.broker").warning(s.redelivery_warning())
    app = Celery("newslora", broker=s.resolved_broker_url, include=["workers.jobs.tasks"])
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        task_ignore_result=True,  # the job row is the result store
        task_acks_late=True,
        task_reject_on_worker_lost=True,  # a killed child puts its message back
        worker_prefetch_multiplier=1,
        task_queues=(Queue("cpu"), Queue("gpu")),
        task_default_queue="cpu",
        task_routes=ROUTES,
        task_soft_time_limit=s.job_time_limit_s + 30,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=s.wait_retries,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # Redis re-delivers an unacked message after visibility_timeout; set it above the longest task
        # (job_time_limit_s) so a healthy long job is not delivered twice; the lease drops it if it is.
        broker_transport_options={"visibility_timeout": max(s.visibility_timeout_s, 1),
                                  "polling_interval": 0.2},
    )
    if s.resolved_broker_url.startswith("sqla+"):
        # kombu's SQLAlchemy transport hands every transport option to create_engine(): give it none,
        # and poll the embedded queue table 5 times a second instead of once.
        import kombu.transport.sqlalchemy as sqla
        sqla.Transport.polling_interval = 0.2
        app.conf.broker_transport_options = {}
    return app


app = create_app()
_senders: dict[str, Celery] = {}


def _sender() -> Celery:
    """The app to send with: the module's own, or one for the broker the settings name now (tests and
    tools that change the environment after import)."""
    url = get_settings().resolved_broker_url
    if app.conf.broker_url == url:
        return app
    if url not in _senders:
        _senders[url] = create_app()
    return _senders[url]


def enqueue(job_id: int, kind: str, queue: str | None = None) -> None:
    """Send a job's task (after its row is committed).

    Raises:
        kombu.exceptions.OperationalError: the broker is unreachable.
    """
    _send(TASK_NAMES[kind], job_id, queue or QUEUES[kind],
          {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1})


def enqueue_advance(pipeline_id: int) -> None:
    _send(ADVANCE_PIPELINE, pipeline_id, "cpu",
          {"max_retries": 5, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2})


def _send(task: str, job_id: int, queue: str, retry_policy: dict[str, float]) -> None:
    """send_task, once more when kombu's Redis channel was closed under it.

    Threads that send at once (the API's) share a broker connection: when the broker restarts, the thread
    that reconnects closes every channel of the old connection, and a thread about to publish on one of
    them fails inside kombu with `AttributeError: 'NoneType' object has no attribute 'client'` (found by
    the soak, tests/reliability/soak.py: a 500 at submission). A second try takes a fresh producer.

    Raises:
        kombu.exceptions.OperationalError: the broker is unreachable (or the channel broke twice).
    """
    for attempt in (1, 2):
        try:
            _sender().send_task(task, args=[job_id], queue=queue, retry=True, retry_policy=retry_policy)
            return
        except AttributeError as e:
            if not _raised_in_kombu(e):
                raise
            if attempt == 2:
                raise BrokerUnavailable(f"the broker connection was reset while sending ({e})") from e


def _raised_in_kombu(e: BaseException) -> bool:
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"{os.sep}kombu{os.sep}" in tb.tb_frame.f_code.co_filename
