"""Jobs: submit one, list them, read one and what it produced (events, predictions, judge scores), cancel one."""
from __future__ import annotations

import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from kombu.exceptions import OperationalError as BrokerError
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.deps import Caller, CallerDep, SessionDep
from api.routers.links import link
from api.submission import check_submission, refuse_oversized
from api.schemas import (IDEMPOTENCY_KEY_PATTERN, MAX_ID, ROW_ERRORS, EventOut, JobCreate, JobKind, JobOut,
                         JobStatus, JobSummary, JobSummaryList, Offset, PredictionOut, PredictionPage, RowId,
                         errors)
from broker.app import enqueue, enqueue_advance
from core.specs import QUEUES, Spec, parse_spec
from core.version import code_version
from db import jobs as jobq
from db import results as resq
from db.models import Job

log = logging.getLogger("newslora.api")
router = APIRouter(prefix="/jobs", tags=["jobs"])

# Where a job's id leads (OpenAPI links: a client, or Schemathesis's stateful phase, follows them).
JOB_OPERATIONS = {"job": ("GET", "/jobs/{job_id}"), "cancel": ("POST", "/jobs/{job_id}/cancel"),
                  "events": ("GET", "/jobs/{job_id}/events"), "predictions": ("GET", "/jobs/{job_id}/predictions"),
                  "predictions_jsonl": ("GET", "/jobs/{job_id}/predictions.jsonl"),
                  "judge_scores": ("GET", "/jobs/{job_id}/judge_scores")}


def job_out(job: Job, session: Session) -> JobOut:
    out = JobOut.model_validate(job)
    out.children = [c.id for c in jobq.children(job.id, session=session)]
    return out


def job_or_404(job_id: int, session: Session, caller: Caller) -> Job:
    """The job, or 404 when it does not exist or belongs to someone else (the same answer: no probing)."""
    try:
        job = jobq.get_job(job_id, session=session)
    except jobq.JobNotFound as e:
        raise HTTPException(404, str(e)) from None
    if not caller.may_see(job.owner_id):
        raise HTTPException(404, f"no job with id {job_id}")
    return job


# ---------------------------------------------------------------- submission

IdempotencyKeyHeader = Annotated[str | None, Header(
    alias="Idempotency-Key", min_length=1, max_length=200, pattern=IDEMPOTENCY_KEY_PATTERN,
    description="A retry with the same key and submission returns the first job (200); "
                "the same key with a different submission answers 409.")]


def idempotency_key_of(body: JobCreate, header: str | None) -> str | None:
    """The key from the `Idempotency-Key` header or the body field (both may be given, if equal)."""
    if header is not None and body.idempotency_key is not None and header != body.idempotency_key:
        raise RequestValidationError([{"loc": ["header", "Idempotency-Key"], "type": "value_error",
                                       "msg": "differs from the body's idempotency_key: send one key"}])
    return header if header is not None else body.idempotency_key


def valid_spec(kind: str, spec: dict[str, Any]) -> Spec:
    """The kind's spec, or 422 with one entry per bad field (the field's path within the spec)."""
    try:
        return parse_spec(kind, spec)
    except ValidationError as e:
        raise HTTPException(422, [{"loc": list(err["loc"]), "msg": err["msg"], "type": err["type"]}
                                  for err in e.errors(include_url=False, include_input=False)]) from None


def first_submission(key: str, kind: str, spec_json: dict[str, Any], parent_id: int | None,
                     session: Session) -> JSONResponse | None:
    """The job first submitted with `key` (HTTP 200) if the submission is the same; 409 naming it if not."""
    existing = jobq.find_by_idempotency_key(key, session=session)
    if existing is None:
        return None
    if (existing.kind, existing.spec, existing.parent_id) != (kind, spec_json, parent_id):
        raise HTTPException(409, f"idempotency key {key!r} was already used by job {existing.id} "
                                 f"({existing.kind}) with a different submission; send a new key, "
                                 f"or GET /jobs/{existing.id}")
    return JSONResponse(job_out(existing, session).model_dump(mode="json"), status_code=200)


@router.post("", response_model=JobOut, status_code=201,
             responses={200: {"model": JobOut, "description": "The job first submitted with this idempotency key "
                                                                 "(the same submission): nothing new was created."},
                        **errors(400, 403, 404, 409, 413, 422, 503)},
             openapi_extra=link("201", "200", to=JOB_OPERATIONS, job_id="$response.body#/id"))
def create_job(body: JobCreate, session: SessionDep, caller: CallerDep,
               idempotency_key: IdempotencyKeyHeader = None) -> JSONResponse:
    key = idempotency_key_of(body, idempotency_key)
    refuse_oversized(body.kind, body.spec)
    spec = valid_spec(body.kind, body.spec)
    check_submission(body.kind, spec, caller, session)
    queue = spec.queue if body.kind == "noop" else QUEUES[body.kind]
    spec_json = spec.model_dump(mode="json")
    if key and (first := first_submission(key, body.kind, spec_json, body.parent_id, session)) is not None:
        return first
    if body.parent_id is not None:
        job_or_404(body.parent_id, session, caller)
    try:
        job = jobq.create_job(session=session, kind=body.kind, queue=queue, spec=spec_json, parent_id=body.parent_id,
                              idempotency_key=key, code_version=code_version(),
                              owner_id=caller.user_id)
        session.commit()
    except IntegrityError:  # a concurrent submission with the same key won
        session.rollback()
        if key and (first := first_submission(key, body.kind, spec_json, body.parent_id, session)) is not None:
            return first
        raise
    # Commit, then enqueue. If the broker is down, take the row back: nothing half-written.
    try:
        enqueue(job.id, body.kind, queue)
    except (BrokerError, OSError) as e:
        session.delete(job)
        session.commit()
        log.warning("broker unavailable at submission: %s", type(e).__name__)
        raise HTTPException(503, "the broker is unavailable; the job was not created, try again shortly",
                            headers={"Retry-After": "2"}) from None
    session.refresh(job)  # as stored now (a worker may have started it already)
    return JSONResponse(job_out(job, session).model_dump(mode="json"), status_code=201)


# ---------------------------------------------------------------- reading

@router.get("", response_model=JobSummaryList, responses=errors(422, 503),
            openapi_extra=link("200", to=JOB_OPERATIONS, job_id="$response.body#/items/0/id"))
def list_jobs(session: SessionDep, caller: CallerDep, kind: JobKind | None = None, status: JobStatus | None = None,
              parent_id: int | None = Query(None, ge=1, le=MAX_ID),
              limit: int = Query(50, ge=1, le=500), offset: Offset = 0) -> JobSummaryList:
    """A page of jobs, newest first: each a summary (no spec: `GET /jobs/{job_id}` has it whole)."""
    rows, total = jobq.list_jobs(session=session, kind=kind, status=status, parent_id=parent_id, limit=limit,
                                 offset=offset, owner_id=caller.owner_filter)
    items = [JobSummary.model_validate(job_out(j, session).model_dump()) for j in rows]
    return JobSummaryList(items=items, total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobOut, responses=ROW_ERRORS)
def get_job(job_id: RowId, session: SessionDep, caller: CallerDep) -> JobOut:
    return job_out(job_or_404(job_id, session, caller), session)


@router.post("/{job_id}/cancel", response_model=JobOut, responses=errors(404, 409, 422, 503))
def cancel_job(job_id: RowId, session: SessionDep, caller: CallerDep) -> JobOut:
    job_or_404(job_id, session, caller)
    try:
        job = jobq.request_cancel(job_id, session=session)
    except jobq.JobStateConflict as e:
        raise HTTPException(409, str(e)) from None
    session.commit()
    if job.kind == "pipeline" or (job.kind == "classify" and jobq.children(job_id, session=session)):
        # A pipeline waiting between its stages (or a classify job waiting for its shards) has no task
        # running to see the cancel: advancing it ends it now and cascades to its children.
        try:
            enqueue_advance(job_id)
        except Exception:  # noqa: BLE001 - the reaper advances it within two leases anyway
            log.warning("cancel of job %s: could not enqueue its advance; the reaper will", job_id)
    return job_out(job, session)


@router.get("/{job_id}/events", response_model=list[EventOut], responses=ROW_ERRORS)
def job_events(job_id: RowId, session: SessionDep, caller: CallerDep, after_id: int = Query(0, ge=0, le=MAX_ID),
               limit: int = Query(200, ge=1, le=1000)) -> list[EventOut]:
    job_or_404(job_id, session, caller)
    return [EventOut.model_validate(e) for e in jobq.events(job_id, session=session, after_id=after_id, limit=limit)]


@router.get("/{job_id}/predictions", response_model=PredictionPage, responses=ROW_ERRORS)
def job_predictions(job_id: RowId, session: SessionDep, caller: CallerDep, offset: Offset = 0,
                    limit: int = Query(100, ge=1, le=5000), failed: bool | None = None) -> PredictionPage:
    job_or_404(job_id, session, caller)
    rows, total = resq.predictions(job_id, session=session, offset=offset, limit=limit, failed=failed)
    return PredictionPage(items=[PredictionOut.model_validate(p) for p in rows], total=total, limit=limit,
                          offset=offset)


@router.get("/{job_id}/predictions.jsonl", response_class=Response,  # Response: errors stay documented as JSON
            responses={200: {"content": {"application/x-ndjson": {"schema": {"type": "string"}}},
                             "description": "One prediction per line, as JSON."}, **ROW_ERRORS})
def job_predictions_jsonl(job_id: RowId, session: SessionDep, caller: CallerDep) -> PlainTextResponse:
    job_or_404(job_id, session, caller)
    lines = [json.dumps(p) for p in resq.all_predictions(job_id, session=session)]
    return PlainTextResponse("\n".join(lines) + ("\n" if lines else ""), media_type="application/x-ndjson")


@router.get("/{job_id}/judge_scores", responses=ROW_ERRORS)
def job_judge_scores(job_id: RowId, session: SessionDep, caller: CallerDep) -> list[dict[str, Any]]:
    job_or_404(job_id, session, caller)
    return resq.judge_scores(job_id, session=session)
