"""Handlers in-process on the embedded store: what a job reads, and how often."""
from __future__ import annotations

from pathlib import Path

import pytest

from core.contracts.adapter import AdapterMeta
from db import jobs as jobq
from db import results as resq
from db.session import init_db, session_scope
from workers.inference.classify import clear_engines
from workers.jobs.handlers import HANDLERS
from workers.jobs.runner import run_job
from tests.conftest import make_tiny_adapter

LABELS = ["World", "Sports", "Business", "Sci/Tech"]


@pytest.fixture
def store(newslora_home):
    init_db()
    clear_engines()  # adapter ids restart in every fresh store: no merged weights of another test's adapter 1
    yield
    clear_engines()


def _job(kind: str, spec: dict) -> int:
    with session_scope() as s:
        return jobq.create_job(session=s, kind=kind, queue="gpu", spec=spec).id


def test_a_classify_job_reads_its_adapters_newslora_json_once(store, tiny_model_dir, tmp_path, monkeypatch):
    adapter_dir = make_tiny_adapter(tiny_model_dir, tmp_path / "adapter", LABELS)
    with session_scope() as s:
        adapter_id = resq.add_model_artifact(session=s, kind="adapter", name="a", base_model=str(tiny_model_dir),
                                             path=str(adapter_dir), spec={}).id
    reads: list[Path] = []
    read_text = Path.read_text

    def counting_read_text(self: Path, *args, **kwargs) -> str:
        if self.name == AdapterMeta.FILE_NAME:
            reads.append(self)
        return read_text(self, *args, **kwargs)
    monkeypatch.setattr(Path, "read_text", counting_read_text)
    spec = {"items": [{"id": "a", "text": "The home team won the final."},
                      {"id": "b", "text": "Stocks fell as oil prices rose."}],
            "model": str(tiny_model_dir), "adapter_id": adapter_id, "dtype": "fp32", "device": "cpu"}
    for n in (1, 2):  # a second job on the same adapter (merged weights cached by the engine): once again
        job_id = _job("classify", spec)
        assert run_job(job_id, "classify", HANDLERS["classify"]) == "succeeded"
        assert reads == [adapter_dir / AdapterMeta.FILE_NAME] * n  # handler, prompt, engine check, merge: one read
    with session_scope() as s:
        job = jobq.get_job(job_id, session=s)
        assert job.result["classified"] == 2 and job.result["label_names"] == LABELS
