"""A cancel that arrives once a job's work is written is too late (found by the soak, issue #27).

The runner used to check for a cancel after the handler had returned, and the train handler between
writing the adapter and registering it: a cancel in that window ended the job `cancelled` with its dataset
or export registered anyway (a registered artifact of a job that did not succeed), or with its adapter
folder written and never registered (an orphan folder). Now the job succeeds and its artifact is
registered once (a registration ends the job in its own transaction, so a cancel after it is refused). Each test runs the real handler in-process (`run_job`, as a worker does) and sends the
cancel exactly in that window; the heartbeat (every 0.05 s here) is what tells the runner.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import select

from db import jobs as jobq
from db.models import Dataset, Job, ModelArtifact
from db.session import init_db, session_scope
from tests.workers.jobs.conftest import make_prep_job
from workers.inference.classify import clear_engines
from workers.jobs.handlers import HANDLERS
from workers.jobs.runner import run_job


@pytest.fixture
def store(newslora_home, monkeypatch):
    from core.settings import reset_settings
    monkeypatch.setenv("NEWSLORA_HEARTBEAT_S", "0.05")
    reset_settings()
    init_db()
    clear_engines()
    yield newslora_home
    clear_engines()


def _cancel_now(job_id: int) -> None:
    """A user's cancel, then long enough for the job's heartbeat to see it."""
    with session_scope() as s:
        jobq.request_cancel(job_id, session=s)
    time.sleep(0.5)


def _status(job_id: int) -> str:
    with session_scope() as s:
        return s.get(Job, job_id).status


def test_a_cancel_after_the_dataset_is_registered_is_refused_and_the_job_succeeded(store, tmp_path):
    job_id = make_prep_job(tmp_path)

    def prep_then_cancel(job, spec, ctx):
        out = HANDLERS["prep"](job, spec, ctx)  # the dataset is written and registered: the job has ended
        with pytest.raises(jobq.JobStateConflict, match="already succeeded"):
            _cancel_now(job.id)
        return out
    assert run_job(job_id, "prep", prep_then_cancel) == "succeeded"
    with session_scope() as s:
        rows = s.scalars(select(Dataset)).all()
        assert [(d.job_id, s.get(Job, d.job_id).status) for d in rows] == [(job_id, "succeeded")]


def test_a_cancel_after_the_adapter_is_written_registers_it_and_the_job_succeeds(store, tmp_path, tiny_model_dir,
                                                                                monkeypatch):
    prep_id = make_prep_job(tmp_path)
    assert run_job(prep_id, "prep", HANDLERS["prep"]) == "succeeded"
    with session_scope() as s:
        dataset_id = s.scalar(select(Dataset.id).where(Dataset.job_id == prep_id))
        job_id = jobq.create_job(session=s, kind="train", queue="gpu", spec={
            "dataset_id": dataset_id, "model": str(tiny_model_dir), "max_steps": 2, "save_every": 1,
            "eval_every": 1000, "val_samples": 4, "batch_size": 4, "max_seq_len": 96, "warmup_steps": 0,
            "dtype": "fp32", "device": "cpu", "lora": {"rank": 4}}).id
    import workers.train
    real_train = workers.train.train_adapter

    def train_then_cancel(*args, **kwargs):
        result = real_train(*args, **kwargs)  # adapters/job-N/adapter is written
        _cancel_now(job_id)
        return result
    monkeypatch.setattr(workers.train, "train_adapter", train_then_cancel)
    assert run_job(job_id, "train", HANDLERS["train"]) == "succeeded"
    assert _status(job_id) == "succeeded"
    with session_scope() as s:
        arts = s.scalars(select(ModelArtifact)).all()
    assert [(a.job_id, a.kind) for a in arts] == [(job_id, "adapter")]
    assert Path(arts[0].path) == store / "adapters" / f"job-{job_id}" / "adapter" and Path(arts[0].path).is_dir()
