"""The main job as a pipeline of child jobs, chained through the queues with no task waiting on another.

`advance(pipeline_id)` is idempotent: it runs when the pipeline is submitted and again each time one of
its children finishes. It reads the children, fails the pipeline with a child's error, creates the
stages whose inputs are ready (each child once: its idempotency key is `pipeline:<id>:<stage>`), and
finishes the pipeline when the evaluation is stored.

Stages: prep -> train; prep -> classify/generate with the base model; train -> classify/generate with
the adapter; generate -> judge; (base, adapter) -> dialogue judge; all -> evaluate (report).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from sqlalchemy.exc import IntegrityError

from broker.app import enqueue
from db import jobs as jobq
from db import results as resq
from db.models import TERMINAL, Job
from db.session import session_scope
from workers.specs import QUEUES, PipelineSpec, parse_spec
from workers.version import code_version

log = logging.getLogger("newslora.pipeline")
PIPELINE_LEASE_S = 10 * 365 * 86400  # a pipeline is never "stale": its children hold the real leases


@dataclass
class Stage:
    name: str
    kind: str
    deps: list[str]
    build: Callable[[dict[str, dict[str, Any]]], dict[str, Any]]  # done stages' results -> child spec
    reuse: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None  # spec -> result, if reusable
    label: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def stages_for(spec: PipelineSpec) -> list[Stage]:
    """The stage graph for a pipeline spec (names are stable: they key the children)."""
    eval_common = {"model": spec.model, "split": "test"}
    score = {**spec.classify, **eval_common, "mode": "score"}
    if spec.eval_limit:
        score["limit"] = spec.eval_limit
    gen = {"max_new_tokens": 8, **spec.generate, **eval_common, "mode": "generate"}
    if spec.generate_limit:
        gen["limit"] = spec.generate_limit

    def ds(r):
        return r["prep"]["dataset_id"]

    def ad(r):
        return r["train"]["adapter_id"]

    st = [
        Stage("prep", "prep", [], lambda r: spec.prep.model_dump(mode="json"), reuse=_reuse_dataset),
        Stage("train", "train", ["prep"], lambda r: {**spec.train, "model": spec.model, "dataset_id": ds(r)},
              reuse=_reuse_adapter if spec.reuse_adapter else None),
        Stage("classify_base", "classify", ["prep"], lambda r: {**score, "dataset_id": ds(r)}),
        Stage("classify_adapter", "classify", ["train"],
              lambda r: {**score, "dataset_id": ds(r), "adapter_id": ad(r)}),
    ]
    if spec.generate_limit:
        st += [
            Stage("generate_base", "classify", ["prep"], lambda r: {**gen, "dataset_id": ds(r)}),
            Stage("generate_adapter", "classify", ["train"],
                  lambda r: {**gen, "dataset_id": ds(r), "adapter_id": ad(r)}),
        ]
        if spec.judge is not None:
            # Each stage gets its own dict: the lambdas close over the name, not its value at this line.
            judge_gen = {k: v for k, v in spec.judge.items() if k != "dialogue"}
            st += [
                Stage("judge_base", "judge", ["generate_base"],
                      lambda r: {**judge_gen, "classify_job_id": r["generate_base"]["job_id"]}),
                Stage("judge_adapter", "judge", ["generate_adapter"],
                      lambda r: {**judge_gen, "classify_job_id": r["generate_adapter"]["job_id"]}),
            ]
    if spec.judge is not None and spec.judge.get("dialogue", True):
        judge_dlg = {k: v for k, v in spec.judge.items() if k not in ("dialogue", "sample")}
        st += [
            Stage("dialogue_base", "judge", ["prep"],
                  lambda r: {**judge_dlg, "dialogue": True, "model": spec.model, "sample": None}),
            Stage("dialogue_adapter", "judge", ["train"],
                  lambda r: {**judge_dlg, "dialogue": True, "model": spec.model, "adapter_id": ad(r), "sample": None}),
        ]
    names = [s.name for s in st]

    def build_eval(r):
        return {
            "name": spec.name,
            "classify_job_ids": [r["classify_base"]["job_id"], r["classify_adapter"]["job_id"]],
            "generate_job_ids": [r[n]["job_id"] for n in ("generate_base", "generate_adapter") if n in r],
            "judge_job_ids": [r[n]["job_id"] for n in ("judge_base", "judge_adapter", "dialogue_base",
                                                       "dialogue_adapter") if n in r],
        }
    st.append(Stage("evaluate", "evaluate", names, build_eval))
    return st


def _reuse_dataset(child_spec: dict[str, Any]) -> dict[str, Any] | None:
    from workers.tasks import spec_hash
    with session_scope() as s:
        ds = resq.dataset_by_spec_hash(spec_hash(parse_spec("prep", child_spec).model_dump(mode="json")), session=s)
        return {"dataset_id": ds.id, "job_id": ds.job_id, "reused": True} if ds else None


def _reuse_adapter(child_spec: dict[str, Any]) -> dict[str, Any] | None:
    from workers.tasks import spec_hash
    norm = parse_spec("train", child_spec).model_dump(mode="json")
    with session_scope() as s:
        ds = resq.get_dataset(norm["dataset_id"], session=s)
        if ds is None:
            return None
        art = resq.artifact_by_spec_hash(spec_hash({**norm, "dataset_hash": ds.hash}), session=s)
        return {"adapter_id": art.id, "job_id": art.job_id, "reused": True} if art else None


def _stage_of(child: Job, pipeline_id: int) -> str | None:
    prefix = f"pipeline:{pipeline_id}:"
    key = child.idempotency_key or ""
    return key[len(prefix):] if key.startswith(prefix) else None


def advance(pipeline_id: int) -> str:
    """Move a pipeline on by one look at its children. Returns its status afterwards."""
    with session_scope() as s:
        job = s.get(Job, pipeline_id)
        if job is None:
            return "missing"
        if job.status in TERMINAL:
            return job.status
        if job.status == "queued":
            outcome = jobq.claim(pipeline_id, "pipeline", session=s, lease_s=PIPELINE_LEASE_S)
            if outcome == "cancelled":
                return "cancelled"
        spec = PipelineSpec.model_validate(job.spec)
        kids = {_stage_of(c, pipeline_id): c for c in jobq.children(pipeline_id, session=s)}
        state: dict[str, Any] = dict((job.result or {}).get("stages") or {})
        cancel = job.cancel_requested
    kids.pop(None, None)

    if cancel:
        if all(c.status in TERMINAL for c in kids.values()):
            _finish(pipeline_id, "cancelled", state)
            return "cancelled"
        return "running"

    for name, child in kids.items():
        if child.status == "failed":
            _cancel_children(pipeline_id)
            _finish(pipeline_id, "failed", state,
                    error=f"stage {name} (job {child.id}) failed: {child.error}")
            return "failed"
        if child.status == "cancelled":
            _finish(pipeline_id, "cancelled", state, error=f"stage {name} (job {child.id}) was cancelled")
            return "cancelled"
        if child.status == "succeeded" and name not in state:
            state[name] = {"job_id": child.id, **_keep(child.result or {})}

    stages = stages_for(spec)
    for stage in stages:
        if stage.name in state or stage.name in kids:
            continue
        if not all(d in state for d in stage.deps):
            continue
        child_spec = stage.build(state)
        if stage.reuse is not None:
            reused = stage.reuse(child_spec)
            if reused is not None:
                state[stage.name] = reused
                _event(pipeline_id, f"stage {stage.name}: reusing {reused}")
                return _save_and_continue(pipeline_id, state)
        _create_child(pipeline_id, stage, child_spec)

    done = sum(1 for st in stages if st.name in state)
    _save_state(pipeline_id, state, progress=done / len(stages))
    if "evaluate" in state:
        ev = state["evaluate"]
        _finish(pipeline_id, "succeeded", state, result_extra={
            "dataset_id": state["prep"].get("dataset_id"), "adapter_id": state["train"].get("adapter_id"),
            "evaluation_id": ev.get("evaluation_id"), "report_path": ev.get("report_path")})
        return "succeeded"
    return "running"


def _keep(result: dict[str, Any]) -> dict[str, Any]:
    """The few result fields later stages and the summary need (not whole metric blobs)."""
    keys = ("dataset_id", "adapter_id", "evaluation_id", "report_path", "accuracy", "items_per_s", "n_items")
    return {k: result[k] for k in keys if k in result}


def _save_and_continue(pipeline_id: int, state: dict[str, Any]) -> str:
    _save_state(pipeline_id, state)
    return advance(pipeline_id)


def _save_state(pipeline_id: int, state: dict[str, Any], progress: float | None = None) -> None:
    with session_scope() as s:
        job = s.get(Job, pipeline_id)
        job.result = {**(job.result or {}), "stages": state}
        if progress is not None:
            job.progress = progress
            job.progress_info = {"done": len(state), "message": "stages"}


def _create_child(pipeline_id: int, stage: Stage, child_spec: dict[str, Any]) -> None:
    spec = parse_spec(stage.kind, child_spec).model_dump(mode="json")
    key = f"pipeline:{pipeline_id}:{stage.name}"
    try:
        with session_scope() as s:
            if jobq.find_by_idempotency_key(key, session=s) is not None:
                return
            child = jobq.create_job(session=s, kind=stage.kind, queue=QUEUES[stage.kind], spec=spec,
                                    parent_id=pipeline_id, idempotency_key=key, code_version=code_version())
            jobq.add_event(pipeline_id, f"stage {stage.name}: job {child.id} queued", session=s,
                           metrics={"stage": stage.name, "child": child.id})
            child_id = child.id
    except IntegrityError:  # another advance() created it first
        return
    enqueue(child_id, stage.kind)


def _event(pipeline_id: int, message: str) -> None:
    with session_scope() as s:
        jobq.add_event(pipeline_id, message, session=s)


def _cancel_children(pipeline_id: int) -> None:
    with session_scope() as s:
        for c in jobq.children(pipeline_id, session=s):
            if c.status not in TERMINAL:
                jobq.request_cancel(c.id, session=s)


def _finish(pipeline_id: int, status: str, state: dict[str, Any], *, error: str | None = None,
            result_extra: dict[str, Any] | None = None) -> None:
    with session_scope() as s:
        jobq.finish(pipeline_id, status, session=s, error=error,
                    result={"stages": state, **(result_extra or {})})
