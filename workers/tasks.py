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
        adapter_path, meta = _adapter_meta(spec.adapter_id)
        adapter = AdapterRef(adapter_id=spec.adapter_id, path=adapter_path)
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


class _JudgeRowsContext:
    """The job's context, with per-item rows going to the judge-score table instead of predictions."""

    def __init__(self, ctx: StoreContext):
        self._ctx = ctx

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)

    def save_predictions(self, rows) -> None:
        from workers.runner import _jsonable
        with session_scope() as s:
            resq.save_judge_scores(self._ctx.job_id, [_jsonable(r) for r in rows], session=s)


def _adapter_meta(adapter_id: int | None) -> tuple[Path | None, dict[str, Any]]:
    if adapter_id is None:
        return None, {}
    art = _adapter(adapter_id)
    meta_file = Path(art.path) / "newslora.json"
    return Path(art.path), (json.loads(meta_file.read_text()) if meta_file.exists() else {})


def _run_judge(job: Job, spec, ctx: StoreContext) -> dict[str, Any]:
    from workers.judge import answer_dialogue, dialogue_items, judge_items, make_judge
    if spec.dialogue:
        from workers.models import load_model
        items = dialogue_items()
        adapter_path, meta = _adapter_meta(spec.adapter_id)
        model, tok = load_model(spec.model)
        if adapter_path is not None:
            from peft import PeftModel
            model = PeftModel.from_pretrained(model, adapter_path).eval()
        ctx.event(f"answering {len(items)} general instructions with {spec.model}"
                  + (f" + adapter {spec.adapter_id}" if spec.adapter_id else ""))
        items = answer_dialogue(items, model, tok, template=meta.get("template", "alpaca"),
                                max_new_tokens=spec.answer_max_new_tokens)
        del model
        source = {"dialogue": True, "model": spec.model, "adapter_id": spec.adapter_id}
    else:
        if spec.classify_job_id is None:
            raise InputError("a judge job needs classify_job_id (a generate-mode classify job) or dialogue=true")
        with session_scope() as s:
            cj = s.get(Job, spec.classify_job_id)
            if cj is None or cj.kind != "classify":
                raise InputError(f"job {spec.classify_job_id} is not a classify job")
            if cj.spec.get("mode") != "generate":
                raise InputError(f"classify job {cj.id} ran in {cj.spec.get('mode')} mode: the judge scores "
                                 f"free-form responses, so judge a generate-mode job")
            preds = resq.all_predictions(cj.id, session=s)
            cresult = cj.result or {}
            cspec = cj.spec
        instruction = cresult.get("instruction") or ""
        texts = {}
        if cspec.get("dataset_id"):
            from workers.prep import load_records
            dataset_dir, _ = _dataset_dir(cspec["dataset_id"])
            for rec in load_records(dataset_dir, cspec.get("split", "test")):
                texts[str(rec["id"])] = rec
        items = []
        for p in preds:
            if p.get("response") is None:
                continue
            rec = texts.get(p["item_id"], {})
            items.append({"item_id": p["item_id"], "instruction": rec.get("instruction") or instruction,
                          "input": rec.get("input", ""), "reference": p.get("gold") or rec.get("output", ""),
                          "response": p["response"]})
        if not items:
            raise InputError(f"classify job {spec.classify_job_id} has no generated responses to judge")
        source = {"classify_job_id": cj.id, "model": cspec.get("model"), "adapter_id": cspec.get("adapter_id")}
    judge = make_judge(spec)
    try:
        rows, summary = judge_items(items, judge, spec, _JudgeRowsContext(ctx))
    finally:
        close = getattr(judge, "close", None)
        if close:
            close()
    return {**source, "n": len(rows), "summary": summary}


def _run_name(cspec: dict[str, Any], n_adapters: int) -> str:
    if not cspec.get("adapter_id"):
        return "base"
    return "fine-tuned" if n_adapters == 1 else f"lora#{cspec['adapter_id']}"


def _loss_history(adapter_id: int | None) -> list[dict[str, Any]] | None:
    """Training loss per step and validation loss per eval, for the report's curves."""
    if adapter_id is None:
        return None
    art = _adapter(adapter_id)
    rows: list[dict[str, Any]] = []
    for f in (Path(art.path).parent / "metrics.jsonl", Path(art.path) / "metrics.jsonl"):
        if f.exists():
            for line in f.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
            break
    return rows or None


def _run_evaluate(job: Job, spec, ctx: StoreContext) -> dict[str, Any]:
    from workers.evaluate import evaluate_runs
    from workers.judge import compare_judgements, summarize_judgements
    from workers.report import write_report
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
        runs = {_run_name(j.spec, n_adapters): resq.all_predictions(j.id, session=s) for j in cjobs}
        gen = {_run_name(j.spec, n_adapters): resq.all_predictions(j.id, session=s) for j in gjobs}
        label_names = (cjobs[0].result or {}).get("label_names")
        judged, dialogue = {}, {}
        for j in jjobs:
            name = _run_name(j.result or j.spec, n_adapters)
            (dialogue if j.spec.get("dialogue") else judged)[name] = resq.judge_scores(j.id, session=s)
        adapter_ids = [j.spec["adapter_id"] for j in cjobs if j.spec.get("adapter_id")]
        base_model = cjobs[0].spec.get("model")
    if not label_names:
        raise InputError("the classify jobs recorded no label names")
    ctx.event(f"evaluating {', '.join(runs)} on {len(next(iter(runs.values())))} items")
    doc = evaluate_runs(runs, label_names, judged or None, spec, generate_runs=gen or None)
    if dialogue:
        doc["dialogue"] = {name: summarize_judgements(rows) for name, rows in dialogue.items()}
        names = list(dialogue)
        if "base" in dialogue and len(names) > 1:
            doc["dialogue_comparisons"] = {n: compare_judgements(dialogue["base"], dialogue[n])
                                           for n in names if n != "base"}
    doc["models_used"] = {"base_model": base_model, "adapter_ids": adapter_ids,
                          "classify_job_ids": spec.classify_job_ids}
    history = _loss_history(adapter_ids[0] if adapter_ids else None)
    if history:
        doc["loss_history"] = history
    report_path = None
    if spec.report:
        report_path = str(write_report(doc, get_settings().path("reports", f"eval-job-{job.id}"),
                                       loss_history=history))
        ctx.event(f"report written: {report_path}")
    with session_scope() as s:
        ev = resq.evaluation_by_job(job.id, session=s) or resq.add_evaluation(
            session=s, job_id=job.id, name=spec.name or f"evaluation {job.id}", spec=spec.model_dump(mode="json"),
            document=doc, report_path=report_path)
        eval_id = ev.id
    acc = {name: m.get("accuracy") for name, m in doc["models"].items()}
    return {"evaluation_id": eval_id, "report_path": report_path, "accuracy": acc}


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
