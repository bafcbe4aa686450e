"""A full disk is a first-class fault (issue #27): a job that hits ENOSPC fails with a message that says so and
names the folder, registers nothing and leaves no half-written folder; once space returns, the next job
succeeds. Each job kind that writes an artifact folder (prep, train, evaluate's report) runs in-process
(`run_job`, as a worker runs it) with the artifact home on a real small tmpfs that is filled before it
starts; the store lives elsewhere.
"""
from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from sqlalchemy import func, select

from db import jobs as jobq
from db import results as resq
from db.models import Dataset, Evaluation, ModelArtifact
from db.session import get_engine, init_db, session_scope
from tests.reliability.services import SmallDisk
from workers.inference.classify import clear_engines
from workers.jobs.handlers import HANDLERS
from workers.jobs.runner import run_job

LABELS = ["World", "Sports", "Business", "Sci/Tech"]
TOPICS = ["leaders met to discuss the ceasefire", "the striker scored twice in the final",
          "stocks fell as the central bank raised rates", "a new chip doubles battery life"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    """NEWSLORA_HOME on an 8 MiB tmpfs; the store (SQLite) outside it."""
    from core.settings import reset_settings
    try:
        disk = SmallDisk(tmp_path / "home", 8).mount()
    except RuntimeError as e:
        pytest.fail(f"{e}: these tests fill a real (small) disk")
    monkeypatch.setenv("NEWSLORA_HOME", str(disk.path))
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'store.sqlite'}")
    monkeypatch.delenv("BROKER_URL", raising=False)
    reset_settings()
    init_db()
    clear_engines()
    yield disk
    clear_engines()
    get_engine.cache_clear()
    reset_settings()
    disk.unmount()


def _run(kind: str, spec: dict) -> tuple[int, str, str | None]:
    with session_scope() as s:
        job_id = jobq.create_job(session=s, kind=kind, queue="cpu", spec=spec).id
    outcome = run_job(job_id, kind, HANDLERS[kind])
    with session_scope() as s:
        job = jobq.get_job(job_id, session=s)
        assert job.status == outcome
        return job_id, job.status, job.error


def _count(model) -> int:
    with session_scope() as s:
        return s.scalar(select(func.count()).select_from(model))


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name)


def _assert_disk_full_error(error: str | None, folder: Path) -> None:
    assert error is not None and error.startswith("DiskFull: the disk is full (no space left on device) under "), error
    assert str(folder) in error and "free space there and run the job again" in error, error


@pytest.fixture
def news_jsonl(tmp_path) -> Path:
    src = tmp_path / "news.jsonl"
    src.write_text("".join(json.dumps({"text": f"{TOPICS[i % 4]} (story {i})", "label": LABELS[i % 4]}) + "\n"
                           for i in range(48)))
    return src


def _prep_spec(src: Path, seed: int = 0) -> dict:
    return {"train": {"path": str(src)}, "test": None, "validation_fraction": 0.25, "seed": seed}


def test_prep_on_a_full_disk_fails_saying_so_and_the_next_prep_succeeds(home, news_jsonl):
    home.fill()
    job_id, status, error = _run("prep", _prep_spec(news_jsonl))
    assert status == "failed"
    _assert_disk_full_error(error, home.path / "datasets" / f"job-{job_id}")
    assert _count(Dataset) == 0
    assert list((home.path / "datasets").iterdir()) == []  # no folder, whole or half, no temp folder
    home.free()
    job_id, status, error = _run("prep", _prep_spec(news_jsonl))
    assert (status, error) == ("succeeded", None)
    from workers.data.prep import load_records
    with session_scope() as s:
        ds = resq.dataset_by_job(job_id, session=s)
    assert len(load_records(Path(ds.path), "train")) + len(load_records(Path(ds.path), "validation")) == 48


def test_training_on_a_full_disk_fails_saying_so_registers_nothing_and_the_next_run_succeeds(home, news_jsonl,
                                                                                           tiny_model_dir):
    job_id, status, _ = _run("prep", _prep_spec(news_jsonl))
    assert status == "succeeded"
    with session_scope() as s:
        dataset_id = resq.dataset_by_job(job_id, session=s).id
    spec = {"dataset_id": dataset_id, "model": str(tiny_model_dir), "max_steps": 2, "save_every": 1,
            "eval_every": 1000, "val_samples": 4, "batch_size": 4, "max_seq_len": 96, "warmup_steps": 0,
            "dtype": "fp32", "device": "cpu", "lora": {"rank": 4}}
    home.fill()
    job_id, status, error = _run("train", spec)
    assert status == "failed"
    _assert_disk_full_error(error, home.path / "adapters" / f"job-{job_id}")
    assert _count(ModelArtifact) == 0
    assert not (home.path / "adapters" / f"job-{job_id}" / "adapter").exists()
    assert _leftovers(home.path) == []
    home.free()
    job_id, status, error = _run("train", spec)
    assert (status, error) == ("succeeded", None)
    from workers.inference.adapter import read_adapter_meta
    with session_scope() as s:
        art = resq.artifact_by_job(job_id, session=s)
    assert read_adapter_meta(Path(art.path)).label_names == LABELS


def _scored_classify_job() -> int:
    """A succeeded score-mode classify job with gold labels, stored as a worker stores one."""
    from core.contracts.prediction import PredictionRow
    with session_scope() as s:
        job = jobq.create_job(session=s, kind="classify", queue="gpu", spec={"items": [], "mode": "score"})
        rows = [PredictionRow(item_id=str(i), seq=i, label=LABELS[i % 4] if i % 3 else LABELS[0], gold=LABELS[i % 4],
                              probs={n: 0.25 for n in LABELS}) for i in range(40)]
        resq.save_predictions(job.id, rows, session=s)
        jobq.finish(job.id, "succeeded", session=s, result={"label_names": LABELS, "mode": "score"})
        return job.id


def test_an_evaluation_report_on_a_full_disk_fails_saying_so_and_the_next_succeeds(home):
    cj = _scored_classify_job()
    spec = {"classify_job_ids": [cj], "bootstrap": 20, "report": True}
    home.fill()
    job_id, status, error = _run("evaluate", spec)
    assert status == "failed"
    _assert_disk_full_error(error, home.path / "reports" / f"eval-job-{job_id}")
    assert _count(Evaluation) == 0
    assert list((home.path / "reports").iterdir()) == []
    home.free()
    job_id, status, error = _run("evaluate", spec)
    assert (status, error) == ("succeeded", None)
    with session_scope() as s:
        ev = resq.evaluation_by_job(job_id, session=s)
    assert Path(ev.report_path) == home.path / "reports" / f"eval-job-{job_id}" / "report.html"
    assert "<html>" in Path(ev.report_path).read_text()


def test_a_report_that_stops_midway_leaves_no_half_written_folder(home, monkeypatch):
    """The disk fills after the first plot was written: before the fix the folder stayed with that one PNG and
    no report.html (and no row pointed at it)."""
    import workers.evaluation.report.page as page
    cj = _scored_classify_job()

    def disk_fills(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(page, "plot_per_class_f1", disk_fills)  # after confusion.png
    job_id, status, error = _run("evaluate", {"classify_job_ids": [cj], "bootstrap": 20, "report": True})
    assert status == "failed"
    _assert_disk_full_error(error, home.path / "reports" / f"eval-job-{job_id}")
    assert list((home.path / "reports").iterdir()) == []
