"""The main job as a pipeline of child jobs, chained through the queues with no task waiting on another.

`advance(pipeline_id)` is idempotent: it runs when the pipeline is submitted and again each time one of
its children finishes. It reads the children, fails the pipeline with a child's error, creates the
stages whose inputs are ready (each child once: its idempotency key is `pipeline:<id>:<stage>`), and
finishes the pipeline when the evaluation is stored.

A pipeline never hangs: every stage spec was checked when it was submitted (PipelineSpec), an advance
that raises fails the pipeline with the error, a cancel ends it whatever its state, and each advance
renews its lease, so the reaper advances again a pipeline nobody has looked at for a lease.

Stages: prep -> train; prep -> classify/generate with the base model; train -> classify/generate with
the adapter; generate -> judge; (base, adapter) -> dialogue judge; all -> evaluate (report).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable

from kombu.exceptions import OperationalError as BrokerUnavailable
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError

from broker.app import enqueue
from core.settings import get_settings
from core.specs import QUEUES, PipelineSpec, parse_spec, spec_hash
from core.version import code_version
from db import jobs as jobq
from db import results as resq
from db.models import TERMINAL, Job, utcnow
from db.session import StoreUnavailable, session_scope

log = logging.getLogger("newslora.pipeline")


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
    """The stage graph for a pipeline spec (names are stable: they key the children). The child specs are
    built by PipelineSpec (`train_spec`, `score_spec`, ...), which checked every one at submission."""

    def ds(r):
        return r["prep"]["dataset_id"]

    def ad(r):
        return r["train"]["adapter_id"]

    st = [
        Stage("prep", "prep", [], lambda r: spec.prep.model_dump(mode="json"), reuse=_reuse_dataset),
        Stage("train", "train", ["prep"], lambda r: spec.train_spec(ds(r)),
              reuse=_reuse_adapter if spec.reuse_adapter else None),
    ]
    if spec.until == "train":
        return st
    st += [
        Stage("classify_base", "classify", ["prep"], lambda r: spec.score_spec(ds(r))),
        Stage("classify_adapter", "classify", ["train"], lambda r: spec.score_spec(ds(r), ad(r))),
    ]
    if spec.generate_limit:
        st += [
            Stage("generate_base", "classify", ["prep"], lambda r: spec.generate_spec(ds(r))),
            Stage("generate_adapter", "classify", ["train"], lambda r: spec.generate_spec(ds(r), ad(r))),
        ]
    if spec.judges_generations:
        st += [
            Stage("judge_base", "judge", ["generate_base"], lambda r: spec.judge_spec(r["generate_base"]["job_id"])),
            Stage("judge_adapter", "judge", ["generate_adapter"],
                  lambda r: spec.judge_spec(r["generate_adapter"]["job_id"])),
        ]
    if spec.judges_dialogue:
        st += [
            Stage("dialogue_base", "judge", ["prep"], lambda r: spec.dialogue_spec()),
            Stage("dialogue_adapter", "judge", ["train"], lambda r: spec.dialogue_spec(ad(r))),
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
    with session_scope() as s:
        ds = resq.dataset_by_spec_hash(spec_hash(parse_spec("prep", child_spec).model_dump(mode="json")), session=s)
        return {"dataset_id": ds.id, "job_id": ds.job_id, "reused": True} if ds else None


def _reuse_adapter(child_spec: dict[str, Any]) -> dict[str, Any] | None:
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
    """Move a pipeline on by one look at its children. Returns its status afterwards.

    A pipeline never waits on something that cannot happen: any error here (a stage spec that does not
    build, a stored spec this code cannot read, a bug) fails the pipeline with that error as its message
    and cancels its children. Only a store or broker outage is raised: the reaper advances the pipeline
    again once its lease has run out.
    """
    try:
        return _advance(pipeline_id)
    except _OUTAGES:
        log.warning("pipeline %s: the store or broker is unavailable; the reaper will advance it again",
                    pipeline_id)
        raise
    except Exception as e:  # noqa: BLE001 - recorded on the pipeline's row, with its reason
        log.exception("pipeline %s: advance failed", pipeline_id)
        return _fail(pipeline_id, str(e) if isinstance(e, StageError) else _describe(e))


class StageError(RuntimeError):
    """A stage's child job could not be built or created; the message names the stage."""


def _describe(e: Exception) -> str:
    """An error as one line: `loc: message` per item for a validation error, else `Type: message`."""
    if isinstance(e, ValidationError):
        return "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" if err["loc"] else err["msg"]
                         for err in e.errors(include_url=False))
    return f"{type(e).__name__}: {e}"


# A store or broker outage: raised by advance() for the reaper to retry, never recorded as the pipeline's failure.
_OUTAGES: tuple[type[BaseException], ...] = (OperationalError, InterfaceError, StoreUnavailable, BrokerUnavailable,
                                             ConnectionError)


def pipeline_lease_s() -> float:
    """How long a pipeline may go without being advanced before the reaper advances it again
    (workers/jobs/runner.py requeue_stale_jobs): a lost "child finished" message, or a cancel that no child
    will report, then costs at most this long."""
    return get_settings().lease_s


def _advance(pipeline_id: int) -> str:
    with session_scope() as s:
        job = s.get(Job, pipeline_id)
        if job is None:
            return "missing"
        if job.status in TERMINAL or job.kind != "pipeline":  # not a pipeline: nothing of ours to advance
            return job.status
        if job.status == "queued":
            outcome = jobq.claim(pipeline_id, "pipeline", session=s, lease_s=pipeline_lease_s())
            if outcome == "cancelled":
                return "cancelled"
        else:  # every look renews the lease: past it, the reaper looks again
            job.lease_expires_at = utcnow() + timedelta(seconds=pipeline_lease_s())
        kids = {_stage_of(c, pipeline_id): c for c in jobq.children(pipeline_id, session=s)}
        state: dict[str, Any] = dict((job.result or {}).get("stages") or {})
        cancel = job.cancel_requested
        raw_spec = job.spec
    kids.pop(None, None)

    if cancel:  # whatever the state: cancel what still runs, end the pipeline once none does
        if _cancel_children(pipeline_id) == 0:
            _finish(pipeline_id, "cancelled", state)
            return "cancelled"
        return "running"  # a running child stops at its next step, then advances this pipeline

    for name, child in kids.items():
        if child.status == "failed":
            _cancel_children(pipeline_id)
            _finish(pipeline_id, "failed", state,
                    error=f"stage {name} (job {child.id}) failed: {child.error}")
            return "failed"
        if child.status == "cancelled":
            _cancel_children(pipeline_id)
            _finish(pipeline_id, "cancelled", state, error=f"stage {name} (job {child.id}) was cancelled")
            return "cancelled"
        if child.status == "succeeded" and name not in state:
            state[name] = {"job_id": child.id, **_keep(child.result or {})}

    try:
        spec = PipelineSpec.model_validate(raw_spec)
    except ValidationError as e:
        raise StageError(f"the stored pipeline spec does not validate: {_describe(e)}") from None
    stages = stages_for(spec)
    for stage in stages:
        if stage.name in state or stage.name in kids:
            continue
        if not all(d in state for d in stage.deps):
            continue
        try:
            child_spec = stage.build(state)
            reused = stage.reuse(child_spec) if stage.reuse is not None else None
            if reused is not None:
                state[stage.name] = reused
                _event(pipeline_id, f"stage {stage.name}: reusing {reused}")
                _save_state(pipeline_id, state)
                return _advance(pipeline_id)
            _create_child(pipeline_id, stage, child_spec)
        except _OUTAGES:
            raise
        except Exception as e:  # noqa: BLE001 - named after its stage, then recorded by advance()
            raise StageError(f"stage {stage.name}: {_describe(e)}") from e

    done = sum(1 for st in stages if st.name in state)
    _save_state(pipeline_id, state, progress=done / len(stages))
    if spec.until == "train" and "train" in state:
        _finish(pipeline_id, "succeeded", state, result_extra={
            "dataset_id": state["prep"].get("dataset_id"), "adapter_id": state["train"].get("adapter_id")})
        return "succeeded"
    if "evaluate" in state:
        ev = state["evaluate"]
        _finish(pipeline_id, "succeeded", state, result_extra={
            "dataset_id": state["prep"].get("dataset_id"), "adapter_id": state["train"].get("adapter_id"),
            "evaluation_id": ev.get("evaluation_id"), "report_path": ev.get("report_path")})
        return "succeeded"
    return "running"


def _fail(pipeline_id: int, error: str) -> str:
    """End a pipeline `failed` with `error`, cancelling its children (its stages so far stay in its result)."""
    with session_scope() as s:
        job = s.get(Job, pipeline_id)
        if job is None or job.status in TERMINAL:
            return job.status if job is not None else "missing"
        state = dict((job.result or {}).get("stages") or {})
    _cancel_children(pipeline_id)
    _finish(pipeline_id, "failed", state, error=error)
    return "failed"


def _keep(result: dict[str, Any]) -> dict[str, Any]:
    """The few result fields later stages and the summary need (not whole metric blobs)."""
    keys = ("dataset_id", "adapter_id", "evaluation_id", "report_path", "accuracy", "items_per_s", "n_items")
    return {k: result[k] for k in keys if k in result}


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
            parent = s.get(Job, pipeline_id)
            if parent is None or parent.status in TERMINAL or parent.cancel_requested:
                return  # cancelled (or finished) while this advance looked: start nothing more
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


def _cancel_children(pipeline_id: int) -> int:
    """Ask every unfinished child to stop (a queued one ends at once). Returns how many still run."""
    with session_scope() as s:
        running = 0
        for c in jobq.children(pipeline_id, session=s):
            if c.status not in TERMINAL and not c.cancel_requested:
                try:
                    c = jobq.request_cancel(c.id, session=s)
                except jobq.JobStateConflict:  # it finished meanwhile
                    s.refresh(c)
            running += c.status not in TERMINAL
        return running


def _finish(pipeline_id: int, status: str, state: dict[str, Any], *, error: str | None = None,
            result_extra: dict[str, Any] | None = None) -> None:
    with session_scope() as s:
        jobq.finish(pipeline_id, status, session=s, error=error,
                    result={"stages": state, **(result_extra or {})})
