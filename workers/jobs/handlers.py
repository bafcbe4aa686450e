"""One handler per kind of job: the typed spec in, the plain function of its module called, what it returned
registered in the store, the job's result out.

The plain functions know nothing of Celery or the store; what a handler reads from the store comes from
`workers.jobs.store_inputs`. `workers.jobs.runner.run_job` does the lease, heartbeat, cancel and terminal
transition around each handler; `workers.jobs.tasks` binds them to Celery tasks.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from core.atomic import reports_disk_full
from core.settings import get_settings
from core.specs import spec_hash
from core.specs.classify import ClassifySpec
from core.specs.evaluate import EvaluateSpec
from core.specs.export import ExportSpec
from core.specs.judge import JudgeSpec
from core.specs.noop import NoopSpec
from core.specs.prep import PrepSpec
from core.specs.train import TrainSpec
from core.version import code_version
from db import results as resq
from db.models import Job
from workers.data.prep import prepare_dataset
from workers.evaluation.evaluate import run_evaluation
from workers.export import export_adapter
from workers.inference.adapter import AdapterRef
from workers.jobs.runner import Handler, StoreContext
from workers.jobs.shards import split
from workers.jobs.store_inputs import (InputError, StoreJudgeInputs, adapter_artifact, adapter_ref,
                                       evaluation_inputs, prepared_dataset)
from workers.judge import JudgeInputError, run_judge

__all__ = ["HANDLERS", "InputError"]


def _run_noop(job: Job, spec: NoopSpec, ctx: StoreContext) -> dict[str, Any]:
    for step in range(spec.steps):
        ctx.check_cancel()
        time.sleep(spec.sleep_s)
        ctx.progress(step + 1, spec.steps, message="step")
    if spec.fail:
        raise RuntimeError("noop job asked to fail")
    return {"steps": spec.steps}


def _run_prep(job: Job, spec: PrepSpec, ctx: StoreContext) -> dict[str, Any]:
    out_dir = get_settings().path("datasets") / f"job-{job.id}"
    if out_dir.exists():  # a re-delivered job: the artifact is complete (written by rename) or absent
        shutil.rmtree(out_dir)
    with reports_disk_full(out_dir):
        meta = prepare_dataset(spec, out_dir, ctx)

    def register(s: Session) -> dict[str, Any]:
        ds = resq.dataset_by_job(job.id, session=s) or resq.add_dataset(
            session=s, job_id=job.id, name=spec.name, path=str(out_dir), hash=meta["hash"],
            spec_hash=spec_hash(spec.model_dump(mode="json")), spec=spec.model_dump(mode="json"), meta=meta)
        return {"dataset_id": ds.id, "path": str(out_dir), "hash": meta["hash"], "meta": meta}
    return ctx.register("the dataset's registration", register)


def _run_train(job: Job, spec: TrainSpec, ctx: StoreContext) -> dict[str, Any]:
    from workers.train import train_adapter  # lazy: torch and peft; a cpu worker's other jobs never load them
    dataset_dir, ds = prepared_dataset(spec.dataset_id)
    out_dir = get_settings().path("adapters", f"job-{job.id}")
    with reports_disk_full(out_dir):  # checkpoints, metrics.jsonl, the adapter
        result = train_adapter(spec, dataset_dir, out_dir, ctx)
    # No cancel check from here on: the adapter is written, and a cancel this late would leave it unregistered.

    def register(s: Session) -> dict[str, Any]:
        art = resq.artifact_by_job(job.id, session=s) or resq.add_model_artifact(
            session=s, job_id=job.id, kind="adapter", name=f"{spec.model}-lora-job{job.id}",
            base_model=spec.model, path=result.adapter_dir,
            spec=spec.model_dump(mode="json"), spec_hash=spec_hash({**spec.model_dump(mode="json"),
                                                                     "dataset_hash": ds.hash}),
            dataset_id=ds.id, dataset_hash=ds.hash, metrics=result.metrics.model_dump(mode="json"),
            code_version=code_version())
        return result.model_copy(update={"adapter_id": art.id}).model_dump(mode="json")  # a TrainResult
    return ctx.register("the adapter's registration", register)


def _run_classify(job: Job, spec: ClassifySpec, ctx: StoreContext) -> dict[str, Any]:
    from workers.inference.classify import run_classify  # lazy: torch; a cpu worker's other jobs never load it
    dataset_dir = prepared_dataset(spec.dataset_id)[0] if spec.dataset_id is not None else None
    adapter = adapter_ref(spec.adapter_id) if spec.adapter_id else None
    # A big batch goes to shard jobs that every gpu worker takes (split raises ShardsPending).
    return run_classify(spec, ctx, dataset_dir=dataset_dir, adapter=adapter,
                        shard=lambda n: split(job.id, spec, n)).model_dump(mode="json")


def _run_judge(job: Job, spec: JudgeSpec, ctx: StoreContext) -> dict[str, Any]:
    try:
        return run_judge(spec, StoreJudgeInputs(), ctx)
    except JudgeInputError as e:
        raise InputError(str(e)) from e


def _run_evaluate(job: Job, spec: EvaluateSpec, ctx: StoreContext) -> dict[str, Any]:
    report_dir = get_settings().path("reports") / f"eval-job-{job.id}"
    with reports_disk_full(report_dir):
        doc, report_path = run_evaluation(spec, evaluation_inputs(spec), ctx, report_dir=report_dir)

    def register(s: Session) -> dict[str, Any]:
        ev = resq.evaluation_by_job(job.id, session=s) or resq.add_evaluation(
            session=s, job_id=job.id, name=spec.name or f"evaluation {job.id}", spec=spec.model_dump(mode="json"),
            document=doc.model_dump(mode="json"), report_path=report_path)
        return {"evaluation_id": ev.id, "report_path": report_path,
                "accuracy": {name: m.get("accuracy") for name, m in doc.models.items()}}
    return ctx.register("the evaluation's registration", register)


def _run_export(job: Job, spec: ExportSpec, ctx: StoreContext) -> dict[str, Any]:
    art = adapter_artifact(spec.adapter_id)
    dataset_id = spec.dataset_id or art.dataset_id
    dataset_dir = prepared_dataset(dataset_id)[0] if spec.verify and dataset_id else None
    out_dir = get_settings().path("exports") / f"job-{job.id}"
    result = export_adapter(spec, AdapterRef(spec.adapter_id, Path(art.path)), out_dir, ctx,
                            dataset_dir=dataset_dir, dataset_hash=art.dataset_hash)

    def register(s: Session) -> dict[str, Any]:
        exp = resq.artifact_by_job(job.id, session=s) or resq.add_model_artifact(
            session=s, job_id=job.id, kind="export", source_adapter_id=spec.adapter_id,
            base_model=art.base_model, path=result["path"],
            name=f"adapter{spec.adapter_id}-{spec.format}" + (f"-{spec.quant}" if spec.quant else ""),
            hash=result["hash"], spec=spec.model_dump(mode="json"),
            spec_hash=spec_hash(spec.model_dump(mode="json")), dataset_id=art.dataset_id,
            dataset_hash=art.dataset_hash, code_version=code_version(),
            metrics={"adapter_id": spec.adapter_id, "format": spec.format, "quant": spec.quant,
                     "files": result["files"], "verification": result["verification"]})
        return {"export_id": exp.id, "path": result["path"], "format": spec.format, "quant": spec.quant,
                "verification": result["verification"]}
    return ctx.register("the export's registration", register)


HANDLERS: dict[str, Handler] = {
    "noop": _run_noop, "prep": _run_prep, "train": _run_train, "classify": _run_classify,
    "judge": _run_judge, "evaluate": _run_evaluate, "export": _run_export}
