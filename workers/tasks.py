"""Thin Celery tasks: take a job id, load the row, call the plain function, record the outcome.

Each `_run_<kind>` handler reads what the job needs from the store, calls the plain function of its
module (which knows nothing of Celery), and registers what it produced. `workers.runner.run_job`
does the lease, heartbeat, cancel and terminal transition around it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from celery.signals import worker_ready

from broker.app import TASK_NAMES, ADVANCE_PIPELINE, app
from broker.settings import get_settings
from db import results as resq
from db.models import Job
from db.session import session_scope
from workers.runner import StoreContext, requeue_stale_jobs, run_job
from workers.version import code_version

log = logging.getLogger("newslora.tasks")


def spec_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:32]


class InputError(ValueError):
    """A job names something that is not there (dataset, adapter, job): the message says what to do."""


# ---------------------------------------------------------------- handlers (one per kind)

def _run_noop(job: Job, spec, ctx: StoreContext) -> dict[str, Any]:
    for step in range(spec.steps):
        ctx.check_cancel()
        time.sleep(spec.sleep_s)
        ctx.progress(step + 1, spec.steps, message="step")
    if spec.fail:
        raise RuntimeError("noop job asked to fail")
    return {"steps": spec.steps}


def _run_prep(job: Job, spec, ctx: StoreContext) -> dict[str, Any]:
    from workers.prep import prepare_dataset
    out_dir = get_settings().path("datasets") / f"job-{job.id}"
    if out_dir.exists():  # a re-delivered job: the artifact is complete (written by rename) or absent
        shutil.rmtree(out_dir)
    meta = prepare_dataset(spec, out_dir, ctx)
    with session_scope() as s:
        ds = resq.dataset_by_job(job.id, session=s) or resq.add_dataset(
            session=s, job_id=job.id, name=spec.name, path=str(out_dir), hash=meta["hash"],
            spec_hash=spec_hash(spec.model_dump(mode="json")), spec=spec.model_dump(mode="json"), meta=meta)
        return {"dataset_id": ds.id, "path": str(out_dir), "hash": meta["hash"], "meta": meta}


def _dataset_dir(dataset_id: int) -> tuple[Path, Any]:
    with session_scope() as s:
        ds = resq.get_dataset(dataset_id, session=s)
        if ds is None:
            raise InputError(f"dataset {dataset_id} is not prepared: run a prep job first (`newslora prep ...`) "
                             f"and use the dataset_id it reports")
        return Path(ds.path), ds


def _run_train(job: Job, spec, ctx: StoreContext) -> dict[str, Any]:
    from workers.train import train_adapter
    dataset_dir, ds = _dataset_dir(spec.dataset_id)
    out_dir = get_settings().path("adapters", f"job-{job.id}")
    result = train_adapter(spec, dataset_dir, out_dir, ctx)
    ctx.check_cancel()
    with session_scope() as s:
        art = resq.artifact_by_job(job.id, session=s) or resq.add_model_artifact(
            session=s, job_id=job.id, kind="adapter", name=f"{spec.model}-lora-job{job.id}",
            base_model=spec.model, path=str(result["adapter_dir"]), hash=result.get("adapter_hash"),
            spec=spec.model_dump(mode="json"), spec_hash=spec_hash({**spec.model_dump(mode="json"),
                                                                     "dataset_hash": ds.hash}),
            dataset_id=ds.id, dataset_hash=ds.hash, metrics=result.get("metrics"), code_version=code_version())
        return {"adapter_id": art.id, **result}


def _adapter(adapter_id: int):
    with session_scope() as s:
        art = resq.get_artifact(adapter_id, session=s)
        if art is None or art.kind != "adapter":
            raise InputError(f"no adapter with id {adapter_id}: list adapters with `newslora models list`")
        return art


def _run_classify(job: Job, spec, ctx: StoreContext) -> dict[str, Any]:
    from workers.infer import AdapterRef, classify_items, get_engine, load_items
    dataset_dir, ds = (None, None)
    if spec.dataset_id is not None:
        dataset_dir, ds = _dataset_dir(spec.dataset_id)
    adapter = None
    label_names, instruction, template = spec.label_names, spec.instruction, spec.template
    if spec.adapter_id is not None:
        art = _adapter(spec.adapter_id)
        adapter = AdapterRef(adapter_id=art.id, path=Path(art.path))
        meta = json.loads((Path(art.path) / "newslora.json").read_text())
        label_names = label_names or meta.get("label_names")
        instruction = instruction or meta.get("instruction")
        template = template or meta.get("template")
    if ds is not None:
        label_names = label_names or ds.meta.get("label_names")
        instruction = instruction or ds.meta.get("instruction")
        template = template or ds.meta.get("template")
    from workers.prompts import default_instruction
    from workers.specs.prep import AG_NEWS_LABELS
    label_names = label_names or list(AG_NEWS_LABELS)
    instruction = instruction or default_instruction(label_names)
    template = template or "alpaca"
    items, rejected = load_items(spec, dataset_dir)
    if rejected:
        ctx.save_predictions([{"item_id": r["id"], "label": None, "error": r["reason"], "flags": ["rejected"],
                               "seq": r.get("seq", 0), "model": spec.model, "adapter_id": spec.adapter_id}
                              for r in rejected])
        ctx.event(f"{len(rejected)} items rejected", level="warning",
                  metrics={"rejected": len(rejected), "examples": rejected[:5]})
    engine = get_engine(spec.model, dtype=spec.dtype, device=spec.device)
    summary = classify_items(items, engine=engine, model_ref=spec.model, adapter=adapter, label_names=label_names,
                             instruction=instruction, template=template, spec=spec, ctx=ctx)
    return {**summary, "rejected": len(rejected), "label_names": label_names, "template": template,
            "dataset_id": spec.dataset_id, "adapter_id": spec.adapter_id, "model": spec.model}


def _run_judge(job: Job, spec, ctx: StoreContext) -> dict[str, Any]:
    from workers.judge import judge_job
    return judge_job(job.id, spec, ctx)


def _run_evaluate(job: Job, spec, ctx: StoreContext) -> dict[str, Any]:
    from workers.evaluation_job import evaluate_job
    return evaluate_job(job.id, spec, ctx)


def _run_pipeline(job: Job, spec, ctx: StoreContext) -> dict[str, Any]:
    raise RuntimeError("pipelines are advanced by newslora.advance_pipeline, not run as one task")


HANDLERS = {"noop": _run_noop, "prep": _run_prep, "train": _run_train, "classify": _run_classify,
            "judge": _run_judge, "evaluate": _run_evaluate}


# ---------------------------------------------------------------- Celery tasks

def _make_task(kind: str):
    def task(job_id: int) -> str:
        return run_job(job_id, kind, HANDLERS[kind])
    task.__name__ = f"run_{kind}"
    return app.task(name=TASK_NAMES[kind], acks_late=True)(task)


for _kind in HANDLERS:
    globals()[f"run_{_kind}"] = _make_task(_kind)


@app.task(name=TASK_NAMES["pipeline"], acks_late=True)
def run_pipeline(job_id: int) -> str:
    from workers.pipeline import advance
    return advance(job_id)


@app.task(name=ADVANCE_PIPELINE, acks_late=True)
def advance_pipeline(job_id: int) -> str:
    from workers.pipeline import advance
    return advance(job_id)


@worker_ready.connect
def _on_worker_ready(**_: Any) -> None:
    """Migrate the store, then re-queue jobs whose worker died (and keep doing so)."""
    import threading
    from db.session import init_db
    init_db()

    def reap() -> None:
        while True:
            try:
                requeue_stale_jobs()
            except Exception as e:  # noqa: BLE001
                log.warning("reaper: %s", e)
            time.sleep(max(2.0, get_settings().lease_s))
    threading.Thread(target=reap, name="reaper", daemon=True).start()
