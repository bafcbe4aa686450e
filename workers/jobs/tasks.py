"""Thin Celery tasks: take a job id, load the row, call the plain function, record the outcome.

Each `_run_<kind>` handler reads what the job needs from the store, calls the plain function of its
module (which knows nothing of Celery), and registers what it produced. `workers.jobs.runner.run_job`
does the lease, heartbeat, cancel and terminal transition around it.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from celery.signals import worker_process_init, worker_ready

from broker.app import TASK_NAMES, ADVANCE_PIPELINE, app
from core.settings import get_settings
from db import results as resq
from db.models import Job
from db.session import session_scope
from workers.jobs.pipeline import advance
from workers.jobs.runner import StoreContext, requeue_stale_jobs, run_job
from core.specs import spec_hash
from core.version import code_version

log = logging.getLogger("newslora.tasks")


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
    from workers.data.prep import prepare_dataset
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
    if not Path(ds.path).is_dir():
        raise InputError(f"dataset {dataset_id}'s folder {ds.path} is not readable on this worker: mount the "
                         f"shared artifact volume (NEWSLORA_HOME) at the same path on every worker")
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
    from workers.inference.classify import AdapterRef, run_classify
    dataset_dir = _dataset_dir(spec.dataset_id)[0] if spec.dataset_id is not None else None
    adapter = AdapterRef(spec.adapter_id, Path(_adapter(spec.adapter_id).path)) if spec.adapter_id else None
    from workers.jobs.shards import split  # a big batch: shard jobs that every gpu worker takes
    return run_classify(spec, ctx, dataset_dir=dataset_dir, adapter=adapter,
                        shard=lambda n: split(job.id, spec, n)).model_dump(mode="json")


class _StoreJudgeInputs:
    """What a judge job reads from the store (`workers.judge.JudgeInputs`)."""

    def classify_run(self, job_id: int):
        from workers.judge import ClassifyRun, JudgeInputError
        with session_scope() as s:
            cj = s.get(Job, job_id)
            if cj is None or cj.kind != "classify":
                raise JudgeInputError(f"job {job_id} is not a classify job")
            preds, cresult, cspec = resq.all_predictions(cj.id, session=s), cj.result or {}, cj.spec
        records = {}
        if cspec.get("dataset_id"):
            from workers.data.prep import load_records
            records = {str(r["id"]): r for r in load_records(_dataset_dir(cspec["dataset_id"])[0],
                                                             cspec.get("split", "test"))}
        return ClassifyRun(job_id=job_id, mode=cspec.get("mode"), predictions=preds,
                           instruction=cresult.get("instruction") or "", label_names=cresult.get("label_names") or [],
                           records=records, model=cspec.get("model"), adapter_id=cspec.get("adapter_id"))

    def adapter(self, adapter_id: int) -> tuple[Path, str]:
        from workers.inference.classify import read_adapter_meta
        path = Path(_adapter(adapter_id).path)
        return path, read_adapter_meta(path).template  # required by the adapter's contract


def _run_judge(job: Job, spec, ctx: StoreContext) -> dict[str, Any]:
    from workers.judge import JudgeInputError, run_judge
    try:
        return run_judge(spec, _StoreJudgeInputs(), ctx)
    except JudgeInputError as e:
        raise InputError(str(e)) from e


def _run_name(cspec: dict[str, Any], n_adapters: int) -> str:
    if not cspec.get("adapter_id"):
        return "base"
    return "fine-tuned" if n_adapters == 1 else f"lora#{cspec['adapter_id']}"


def _evaluation_inputs(spec) -> Any:
    """The rows an evaluate job reads: predictions and judge rows by model name, and where the data lies."""
    from workers.evaluation.evaluate import EvaluationInputs
    with session_scope() as s:
        def load(ids: list[int], what: str) -> list[Job]:
            jobs = []
            for i in ids:
                j = s.get(Job, i)
                if j is None or j.kind != what:
                    raise InputError(f"job {i} is not a {what} job")
                if j.status != "succeeded":
                    raise InputError(f"{what} job {i} is {j.status}, not succeeded")
                jobs.append(j)
            return jobs
        cjobs, gjobs, jjobs = (load(spec.classify_job_ids, "classify"), load(spec.generate_job_ids, "classify"),
                               load(spec.judge_job_ids, "judge"))
        n_adapters = len({j.spec.get("adapter_id") for j in cjobs if j.spec.get("adapter_id")})
        inputs = EvaluationInputs(
            runs={_run_name(j.spec, n_adapters): resq.all_predictions(j.id, session=s) for j in cjobs},
            generate_runs={_run_name(j.spec, n_adapters): resq.all_predictions(j.id, session=s) for j in gjobs},
            label_names=(cjobs[0].result or {}).get("label_names") or [],
            split=cjobs[0].spec.get("split", "test"))
        for j in jjobs:
            rows = resq.judge_scores(j.id, session=s)
            (inputs.dialogue if j.spec.get("dialogue") else inputs.judged)[_run_name(j.result or j.spec,
                                                                                      n_adapters)] = rows
        adapter_ids = [j.spec["adapter_id"] for j in cjobs if j.spec.get("adapter_id")]
        inputs.models_used = {"base_model": cjobs[0].spec.get("model"), "adapter_ids": adapter_ids,
                              "classify_job_ids": spec.classify_job_ids}
        dataset_id = cjobs[0].spec.get("dataset_id")
    if dataset_id is not None:
        inputs.dataset_dir = _dataset_dir(dataset_id)[0]
    if adapter_ids:
        inputs.run_dir = Path(_adapter(adapter_ids[0]).path).parent
    return inputs


def _run_evaluate(job: Job, spec, ctx: StoreContext) -> dict[str, Any]:
    from workers.evaluation.evaluate import run_evaluation
    doc, report_path = run_evaluation(spec, _evaluation_inputs(spec), ctx,
                                      report_dir=get_settings().path("reports", f"eval-job-{job.id}"))
    with session_scope() as s:
        ev = resq.evaluation_by_job(job.id, session=s) or resq.add_evaluation(
            session=s, job_id=job.id, name=spec.name or f"evaluation {job.id}", spec=spec.model_dump(mode="json"),
            document=doc.model_dump(mode="json"), report_path=report_path)
        return {"evaluation_id": ev.id, "report_path": report_path,
                "accuracy": {name: m.get("accuracy") for name, m in doc.models.items()}}


def _run_export(job: Job, spec, ctx: StoreContext) -> dict[str, Any]:
    from workers.export import export_adapter
    from workers.inference.classify import AdapterRef
    with session_scope() as s:  # a re-delivered job whose export was registered: done
        done = resq.artifact_by_job(job.id, session=s)
        if done is not None:
            return {"export_id": done.id, "path": done.path, **(done.metrics or {})}
    art = _adapter(spec.adapter_id)
    dataset_id = spec.dataset_id or art.dataset_id
    dataset_dir = _dataset_dir(dataset_id)[0] if spec.verify and dataset_id else None
    out_dir = get_settings().path("exports") / f"job-{job.id}"
    result = export_adapter(spec, AdapterRef(spec.adapter_id, Path(art.path)), out_dir, ctx,
                            dataset_dir=dataset_dir, dataset_hash=art.dataset_hash)
    with session_scope() as s:
        exp = resq.add_model_artifact(
            session=s, job_id=job.id, kind="export", base_model=art.base_model, path=result["path"],
            name=f"adapter{spec.adapter_id}-{spec.format}" + (f"-{spec.quant}" if spec.quant else ""),
            hash=result["hash"], spec=spec.model_dump(mode="json"), spec_hash=spec_hash(spec.model_dump(mode="json")),
            dataset_id=art.dataset_id, dataset_hash=art.dataset_hash, code_version=code_version(),
            metrics={"adapter_id": spec.adapter_id, "format": spec.format, "quant": spec.quant,
                     "files": result["files"], "verification": result["verification"]})
        return {"export_id": exp.id, "path": result["path"], "format": spec.format, "quant": spec.quant,
                "verification": result["verification"]}


HANDLERS = {"noop": _run_noop, "prep": _run_prep, "train": _run_train, "classify": _run_classify,
            "judge": _run_judge, "evaluate": _run_evaluate, "export": _run_export}


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
    return advance(job_id)


@app.task(name=ADVANCE_PIPELINE, acks_late=True)
def advance_pipeline(job_id: int) -> str:
    from workers.jobs.shards import advance as advance_shards  # a sharded classify job's shard ended
    return advance_shards(job_id) or advance(job_id)


@worker_process_init.connect
def _on_worker_process_init(**_: Any) -> None:
    """Apply NEWSLORA_TORCH_THREADS in each worker process before it runs a job."""
    threads = get_settings().torch_threads
    if threads:
        import torch
        torch.set_num_threads(threads)


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
