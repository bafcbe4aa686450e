"""A handler's registration survives a database restart (found by the soak, tests/reliability/soak.py: a train
job whose adapter was written failed on `OperationalError` at registration while PostgreSQL restarted, and left
`adapters/job-N/adapter` with no row). The store's first registration write fails as a restart makes it fail;
the handler retries it and the job succeeds with exactly one row."""
from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import InterfaceError, OperationalError, ProgrammingError

from db import jobs as jobq
from db import results as resq
from db.models import Dataset, ModelArtifact
from db.session import get_engine, init_db, session_scope
from workers.inference.classify import clear_engines
from workers.jobs.handlers import HANDLERS
from workers.jobs.runner import run_job


@pytest.fixture
def store(tmp_path, monkeypatch):
    from core.settings import reset_settings
    monkeypatch.setenv("NEWSLORA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'store.sqlite'}")
    monkeypatch.setenv("NEWSLORA_WAIT_RETRIES", "3")
    monkeypatch.delenv("BROKER_URL", raising=False)
    reset_settings()
    init_db()
    clear_engines()
    yield tmp_path
    clear_engines()
    get_engine.cache_clear()
    reset_settings()


def _fail_once(monkeypatch, name: str) -> list[int]:
    """Make resq.<name> raise OperationalError (the database restarting) on its first call."""
    real, calls = getattr(resq, name), []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("INSERT ...", {}, ConnectionRefusedError("connection refused"))
        return real(*args, **kwargs)
    monkeypatch.setattr(resq, name, flaky)
    return calls


def _run(kind: str, spec: dict) -> tuple[int, str, str | None]:
    with session_scope() as s:
        job_id = jobq.create_job(session=s, kind=kind, queue="cpu", spec=spec).id
    run_job(job_id, kind, HANDLERS[kind])
    with session_scope() as s:
        job = jobq.get_job(job_id, session=s)
        return job_id, job.status, job.error


def _count(model) -> int:
    with session_scope() as s:
        return s.scalar(select(func.count()).select_from(model))


def test_prep_and_train_register_through_a_database_blink(store, monkeypatch, tiny_model_dir):
    src = store / "news.jsonl"
    src.write_text("".join(json.dumps({"text": f"story {i} about {lab}", "label": lab}) + "\n"
                           for i in range(12) for lab in ("World", "Sports")))
    calls = _fail_once(monkeypatch, "add_dataset")
    job_id, status, error = _run("prep", {"train": {"path": str(src)}, "test": None, "validation_fraction": 0.25})
    assert (status, error) == ("succeeded", None) and len(calls) == 2 and _count(Dataset) == 1
    with session_scope() as s:
        dataset_id = resq.dataset_by_job(job_id, session=s).id

    calls = _fail_once(monkeypatch, "add_model_artifact")
    spec = {"dataset_id": dataset_id, "model": str(tiny_model_dir), "max_steps": 1, "eval_every": 1000,
            "val_samples": 2, "batch_size": 4, "max_seq_len": 96, "warmup_steps": 0, "dtype": "fp32",
            "device": "cpu", "lora": {"rank": 4}}
    job_id, status, error = _run("train", spec)
    assert (status, error) == ("succeeded", None) and len(calls) == 2
    assert _count(ModelArtifact) == 1
    with session_scope() as s:
        assert resq.artifact_by_job(job_id, session=s).kind == "adapter"


@pytest.mark.parametrize("error", [
    OperationalError("SELECT model_artifacts ...", {}, ConnectionResetError("server closed the connection")),
    # the soak's second run: psycopg on a connection cut mid-commit
    InterfaceError("COMMIT", {}, RuntimeError("unexpected result EMPTY_QUERY from command 'COMMIT'")),
    # its third run: a pooled connection the restart left mid-transaction
    ProgrammingError("SELECT ...", {}, RuntimeError("can't change 'autocommit' now: connection in transaction "
                                                    "status INTRANS"))],
    ids=["operational", "interface", "autocommit"])
def test_a_classify_job_whose_adapter_read_meets_a_database_outage_runs_again(store, monkeypatch, tiny_model_dir,
                                                                             error):
    """Found by the soak (second 10-minute run): a classify job failed on `OperationalError: ... server closed
    the connection unexpectedly` reading its adapter's row while PostgreSQL restarted. The runner now runs a
    handler again when the store was unreachable (handlers are idempotent by job id)."""
    from workers.jobs import store_inputs
    from tests.conftest import make_tiny_adapter
    adapter_dir = make_tiny_adapter(tiny_model_dir, store / "adapter")
    with session_scope() as s:
        art = resq.add_model_artifact(session=s, job_id=None, kind="adapter", name="tiny", base_model=str(tiny_model_dir), spec={},
                                      path=str(adapter_dir))
        adapter_id = art.id
    real, calls = store_inputs.adapter_artifact, []

    def flaky(adapter_id: int):
        calls.append(1)
        if len(calls) == 1:
            raise error
        return real(adapter_id)
    monkeypatch.setattr(store_inputs, "adapter_artifact", flaky)
    job_id, status, error = _run("classify", {"items": [{"id": "a", "text": "stocks fell"}], "model": str(tiny_model_dir),
                                              "adapter_id": adapter_id, "dtype": "fp32", "device": "cpu"})
    assert (status, error) == ("succeeded", None) and len(calls) == 2
    with session_scope() as s:
        events = [e.message for e in jobq.events(job_id, session=s)]
    assert any("database was unavailable" in m for m in events), events


def test_progress_after_a_cancel_writes_nothing_and_stops_the_job(store):
    """Found by the soak (second 10-minute run): a classify job cancelled by the API went on writing
    "classified" progress events until its heartbeat saw the cancel. A progress write now checks, under the
    row's lock, that the job has not ended: after a cancel it writes nothing and the job stops at its next check."""
    from core.context import JobCancelled
    from workers.jobs.runner import StoreContext
    with session_scope() as s:
        job = jobq.create_job(session=s, kind="classify", queue="gpu", spec={"items": []})
        job.status = "running"
        job_id = job.id
    ctx = StoreContext(job_id, "w", store / "work", time_limit_s=60)  # no heartbeat thread started
    ctx.progress(1, 10, message="classified")
    with session_scope() as s:
        jobq.finish(job_id, "cancelled", session=s, message="cancelled")
        before = len(jobq.events(job_id, session=s))
    ctx.progress(10, 10, message="classified")  # final: would always write an event
    with session_scope() as s:
        assert len(jobq.events(job_id, session=s)) == before and jobq.get_job(job_id, session=s).progress < 1
    with pytest.raises(JobCancelled):
        ctx.check_cancel()


def test_a_bad_statement_is_not_taken_for_an_outage():
    from workers.jobs.runner import is_store_down
    assert not is_store_down(ProgrammingError("SELECT nope", {}, RuntimeError('column "nope" does not exist')))


def test_a_sharded_job_whose_shards_meet_a_broker_outage_runs_again(store, monkeypatch, tiny_model_dir):
    """Found by the soak (seed 1's run on the final code): a sharded classify job failed with `OperationalError:
    Error 111 connecting to ...` sending its shards while Redis restarted. The runner runs the handler again
    once the broker answers: the shards already made are sent, not made again."""
    import broker.app
    from kombu.exceptions import OperationalError as BrokerUnavailable
    monkeypatch.setenv("NEWSLORA_CLASSIFY_SHARD_SIZE", "2")
    from core.settings import reset_settings
    reset_settings()
    sent: list[int] = []

    def flaky_enqueue(job_id: int, kind: str, queue: str | None = None) -> None:
        if not sent:
            sent.append(-1)
            raise BrokerUnavailable("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        sent.append(job_id)
    monkeypatch.setattr(broker.app, "enqueue", flaky_enqueue)
    monkeypatch.setattr(broker.app, "enqueue_advance", lambda job_id: None)
    items = [{"id": f"a{i}", "text": f"story {i}"} for i in range(5)]
    with session_scope() as s:
        job_id = jobq.create_job(session=s, kind="classify", queue="gpu",
                                 spec={"items": items, "model": str(tiny_model_dir), "dtype": "fp32"}).id
    assert run_job(job_id, "classify", HANDLERS["classify"]) == "sharded"
    with session_scope() as s:
        kids = jobq.children(job_id, session=s)
        events = [e.message for e in jobq.events(job_id, session=s)]
    assert len(kids) == 3 and sorted(sent[1:]) == sorted(k.id for k in kids)  # three shards, each sent once
    assert any("broker was unavailable" in m for m in events), events
