"""The main job: end to end on a tiny model and tiny data through a real worker on Redis + PostgreSQL, and
in-process on the embedded store, the ways a pipeline used to hang (a bad stage setting, an advance that
raised, a cancel between stages)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import AG_NEWS_DIR


def on_services(test):
    """An end-to-end test: a real worker on Redis and PostgreSQL."""
    return pytest.mark.slow(pytest.mark.redis(pytest.mark.postgres(test)))


def tiny_pipeline(model_dir: Path, **over) -> dict:
    spec = {
        "name": "tiny",
        "model": str(model_dir),
        "prep": {"name": "tiny-agnews", "train": {"path": str(AG_NEWS_DIR / "train.jsonl")},
                 "test": {"path": str(AG_NEWS_DIR / "test.csv")}, "max_per_class": 12, "test_max_per_class": 5,
                 "validation_fraction": 0.1},
        "train": {"max_steps": 3, "batch_size": 4, "warmup_steps": 1, "eval_every": 2, "save_every": 2,
                  "val_samples": 4, "max_seq_len": 96, "dtype": "fp32"},
        "classify": {"batch_size": 8, "dtype": "fp32"},
        "generate": {"max_new_tokens": 3, "dtype": "fp32"},
        "generate_limit": 4,
        "judge": {"backend": "local", "judge_model": str(model_dir), "sample": 2, "max_new_tokens": 8,
                  "answer_max_new_tokens": 4, "dialogue": True},
    }
    spec.update(over)
    return spec


@on_services
def test_pipeline_runs_to_a_stored_evaluation(redis_pg_stack, tiny_model_dir):
    c = redis_pg_stack.client()
    job = c.submit_pipeline(tiny_pipeline(tiny_model_dir))
    done = c.wait(job["id"], timeout=600)
    assert done["status"] == "succeeded", (done["error"], redis_pg_stack.log("worker")[-4000:])
    kids = {k["idempotency_key"].rsplit(":", 1)[1]: k for k in (c.get(i) for i in done["children"])}
    assert set(kids) == {"prep", "train", "classify_base", "classify_adapter", "generate_base", "generate_adapter",
                         "judge_base", "judge_adapter", "dialogue_base", "dialogue_adapter", "evaluate"}
    assert all(k["status"] == "succeeded" and k["parent_id"] == job["id"] for k in kids.values())
    assert kids["train"]["queue"] == "gpu" and kids["evaluate"]["queue"] == "cpu"
    # 5 test articles a class: every one classified once by each model, every label valid.
    for stage in ("classify_base", "classify_adapter"):
        preds = c.predictions(kids[stage]["id"], limit=1000)
        assert preds["total"] == 20
        assert {p["label"] for p in preds["items"]} <= {"World", "Sports", "Business", "Sci/Tech"}
        assert all(abs(sum(p["probs"].values()) - 1) < 1e-3 for p in preds["items"])
    judged = [r for r in c.judge_scores(kids["judge_adapter"]["id"]) if not r["item_id"].startswith("control/")]
    assert len(judged) == 2  # sample=2 (besides the judge's control items)
    ev = c.evaluation(done["result"]["evaluation_id"])
    assert set(ev["document"]["models"]) == {"base", "fine-tuned"}
    assert ev["document"]["models"]["base"]["n"] == 20
    assert "fine-tuned" in ev["document"]["comparisons"]
    assert Path(ev["report_path"]).exists()
    adapter = c.model(done["result"]["adapter_id"])
    assert adapter["kind"] == "adapter" and adapter["dataset_hash"] == c.dataset(done["result"]["dataset_id"])["hash"]

    # The CLI reads the same results back (it talks to the API, never the database).
    import os, subprocess, sys
    env = dict(os.environ, NEWSLORA_API_URL=redis_pg_stack.url, NEWSLORA_HOME=str(redis_pg_stack.log_dir))
    cli = [sys.executable, "-m", "api_client.cli"]
    shown = subprocess.run(cli + ["eval", "show", str(ev["id"])], env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "fine-tuned" in shown.stdout and "accuracy" in shown.stdout.lower(), shown.stderr
    out = redis_pg_stack.log_dir / "cli-report"
    rep = subprocess.run(cli + ["eval", "report", str(ev["id"]), "--out", str(out)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert rep.returncode == 0 and (out / "report.html").exists(), rep.stderr
    tree = subprocess.run(cli + ["jobs", "show", str(job["id"])], env=env, capture_output=True, text=True, timeout=120)
    assert tree.returncode == 0 and "children:" in tree.stdout and "evaluate" in tree.stdout

    # The same spec again reuses the prepared dataset (no second prep job).
    again = c.wait(c.submit_pipeline(tiny_pipeline(tiny_model_dir, judge=None, generate_limit=0,
                                                   reuse_adapter=True))["id"], timeout=600)
    assert again["status"] == "succeeded", again["error"]
    stages = again["result"]["stages"]
    assert stages["prep"]["reused"] and stages["prep"]["dataset_id"] == done["result"]["dataset_id"]
    assert stages["train"]["reused"] and stages["train"]["adapter_id"] == done["result"]["adapter_id"]


@on_services
def test_failed_child_fails_the_pipeline_and_cancel_reaches_children(redis_pg_stack, tiny_model_dir):
    c = redis_pg_stack.client()
    bad = tiny_pipeline(tiny_model_dir, judge=None, generate_limit=0)
    bad["train"] = {**bad["train"], "lora": {"target_modules": ["no_such_proj"]}}
    job = c.wait(c.submit_pipeline(bad)["id"], timeout=600)
    assert job["status"] == "failed"
    assert "stage train" in job["error"] and "no_such_proj" in job["error"]

    slow = tiny_pipeline(tiny_model_dir, judge=None, generate_limit=0)
    slow["train"] = {**slow["train"], "max_steps": 500, "save_every": 50}
    job = c.submit_pipeline(slow)
    deadline = time.monotonic() + 300
    while True:
        kids = [c.get(i) for i in c.get(job["id"])["children"]]
        if any(k["kind"] == "train" and k["status"] == "running" for k in kids):
            break
        assert time.monotonic() < deadline
        time.sleep(0.5)
    c.cancel(job["id"])
    done = c.wait(job["id"], timeout=120)
    assert done["status"] == "cancelled"
    kids = [c.get(i) for i in done["children"]]
    assert all(k["status"] in ("cancelled", "succeeded") for k in kids)
    assert any(k["kind"] == "train" and k["status"] == "cancelled" for k in kids)


# --- never hangs: in-process on the embedded store (SQLite), no worker -----------------------------------

@pytest.fixture
def store(newslora_home, monkeypatch):
    """The embedded store, migrated; messages a pipeline sends are recorded instead of sent."""
    from db.session import init_db
    init_db()
    sent: list[tuple] = []
    monkeypatch.setattr("workers.jobs.pipeline.enqueue", lambda *a: sent.append(a))
    monkeypatch.setattr("broker.app.enqueue", lambda *a: sent.append(a))
    return sent


def submitted(spec: dict) -> int:
    """A pipeline row as the API writes it (spec validated and dumped), before any advance."""
    from db import jobs as jobq
    from db.session import session_scope
    from core.specs import parse_spec
    with session_scope() as s:
        return jobq.create_job(session=s, kind="pipeline", queue="cpu",
                               spec=parse_spec("pipeline", spec).model_dump(mode="json")).id


def row(job_id: int):
    from db.models import Job
    from db.session import session_scope
    with session_scope() as s:
        job = s.get(Job, job_id)
        s.expunge(job)
        return job


def kids(job_id: int) -> dict:
    from db import jobs as jobq
    from db.session import session_scope
    with session_scope() as s:
        return {c.idempotency_key.rsplit(":", 1)[1]: c for c in jobq.children(job_id, session=s)}


HUB_PREP = {"train": {"path": "fancyzhx/ag_news", "format": "hub"}, "test": None}


def test_a_bad_stage_setting_is_refused_at_submission_naming_the_field(newslora_home):
    from fastapi.testclient import TestClient
    from api.app import app
    with TestClient(app) as api:
        t0 = time.monotonic()
        r = api.post("/jobs", json={"kind": "pipeline", "spec": {"train": {"lora": {"rank": -5}}}})
        assert time.monotonic() - t0 < 5
        assert r.status_code == 422
        assert [(d["loc"], d["msg"]) for d in r.json()["detail"]] == [
            (["train", "lora", "rank"], "Input should be greater than or equal to 1")]
        r = api.post("/jobs", json={"kind": "pipeline", "spec": {"train": {"lerning_rate": 1e-4},
                                                                 "judge": {"backend": "remote"}}})
        assert r.status_code == 422
        assert {(".".join(d["loc"]), d["type"]) for d in r.json()["detail"]} == {
            ("train.lerning_rate", "extra_forbidden"), ("judge.backend", "literal_error")}
        assert api.get("/jobs").json()["total"] == 0


def test_an_advance_that_raises_fails_the_pipeline_with_the_error(store, monkeypatch):
    from workers.jobs.pipeline import advance

    def broken(spec):
        raise RuntimeError("the datasets table is gone")
    monkeypatch.setattr("workers.jobs.pipeline._reuse_dataset", broken)
    job_id = submitted({"prep": HUB_PREP})
    assert advance(job_id) == "failed"
    job = row(job_id)
    assert (job.status, job.error) == ("failed", "stage prep: RuntimeError: the datasets table is gone")
    assert advance(job_id) == "failed" and not kids(job_id)

    # A spec stored by older code that this code cannot build a stage from: failed, naming the field.
    from db.session import session_scope
    from db.models import Job
    job_id = submitted({"prep": HUB_PREP})
    with session_scope() as s:
        s.get(Job, job_id).spec = {**row(job_id).spec, "train": {"lora": {"rank": -5}}}
    assert advance(job_id) == "failed"
    assert "train.lora.rank: Input should be greater than or equal to 1" in row(job_id).error


def _prep_done(job_id: int) -> None:
    """The prep child succeeds (as its worker would record it); nobody has advanced the pipeline since."""
    from db import jobs as jobq
    from db.session import session_scope
    with session_scope() as s:
        prep = kids(job_id)["prep"]
        jobq.claim(prep.id, "w", session=s, lease_s=60)
        jobq.finish(prep.id, "succeeded", session=s, result={"dataset_id": 1})


def test_cancel_ends_a_pipeline_waiting_between_stages_and_its_children(store, monkeypatch):
    from db import jobs as jobq
    from db.session import session_scope
    from workers.jobs.pipeline import advance
    from workers.jobs.runner import requeue_stale_jobs
    monkeypatch.setenv("NEWSLORA_LEASE_S", "0.3")
    from core.settings import reset_settings
    reset_settings()
    monkeypatch.setattr("workers.jobs.pipeline._reuse_dataset", lambda spec: None)

    # Waiting between stages: prep is done, its "advance" message was lost. The reaper advances it again.
    lost = submitted({"prep": HUB_PREP, "generate_limit": 0, "judge": None})
    assert advance(lost) == "running" and set(kids(lost)) == {"prep"}
    _prep_done(lost)
    time.sleep(0.4)
    store.clear()
    assert lost in requeue_stale_jobs() and store == [(lost, "pipeline", "cpu")]
    assert advance(lost) == "running" and set(kids(lost)) == {"prep", "train", "classify_base"}

    # Cancel now: the queued children end at once; no child is left to report, so the reaper ends it.
    with session_scope() as s:
        assert jobq.request_cancel(lost, session=s).status == "running"
    assert {k.status for n, k in kids(lost).items() if n != "prep"} == {"cancelled"}
    time.sleep(0.4)
    assert lost in requeue_stale_jobs()
    assert advance(lost) == "cancelled" and row(lost).status == "cancelled"

    # Running with a running child: the child is asked to stop; its end advances the pipeline to cancelled.
    busy = submitted({"prep": HUB_PREP})
    advance(busy)
    with session_scope() as s:
        jobq.claim(kids(busy)["prep"].id, "w", session=s, lease_s=60)
        jobq.request_cancel(busy, session=s)
    assert advance(busy) == "running" and kids(busy)["prep"].cancel_requested
    with session_scope() as s:
        jobq.finish(kids(busy)["prep"].id, "cancelled", session=s)
    assert advance(busy) == "cancelled"

    # Running with no child at all (cancelled before its first advance created one).
    empty = submitted({"prep": HUB_PREP})
    with session_scope() as s:
        jobq.claim(empty, "pipeline", session=s, lease_s=0.3)
        jobq.request_cancel(empty, session=s)
    time.sleep(0.4)
    assert empty in requeue_stale_jobs() and advance(empty) == "cancelled" and not kids(empty)
