"""`/v1/batches`: a JSONL of chat or completions requests answered by one classify job, in OpenAI's shapes.

Creating a batch reads its input file line by line (core/openai_shapes.py): a bad line goes to the error
file with its number, the good ones become the items of one classify job (sharded over the gpu workers,
resumed after a worker dies, each item stored once). While the job runs the batch's status and
`request_counts` are read from it; once it has ended, the first request that sees it builds the output and
error files (each line's body what the synchronous endpoint answers) and stores the final status.
"""
from __future__ import annotations

import json
from datetime import timedelta
from typing import Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.deps import Caller, CallerDep, SessionDep
from api.routers.links import link
from api.routers.openai.errors import OpenAIError, openai_errors
from api.routers.openai.files import file_or_404, store_output_file
from api.routers.openai.idempotency import IdempotencyKeyHeader, fingerprint, remember, replayed
from api.routers.openai.pages import cursor_page
from api.routers.openai.serving import (cancel_job, classify_spec, epoch, generation_options, resolve_model,
                                        submit_classify)
from core import filestore
from core.openai_shapes import (ENDPOINTS, AnswerOptions, error_line, jsonl, parse_batch, prediction_line)
from db import batches as batchq
from db import idempotency as keyq
from db import results as resq
from db.models import TERMINAL, Batch, Job, utcnow

router = APIRouter(prefix="/v1/batches", tags=["openai"])

FINAL = ("completed", "failed", "cancelled", "expired")
BATCH_OPERATIONS = {"batch": ("GET", "/v1/batches/{batch_id}"), "cancel": ("POST", "/v1/batches/{batch_id}/cancel")}
WINDOW = timedelta(hours=24)


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="allow")
    input_file_id: str = Field(min_length=1, max_length=40)
    endpoint: Literal[ENDPOINTS]  # type: ignore[valid-type]
    completion_window: Literal["24h"]
    metadata: dict[str, str] | None = Field(default=None, max_length=16)


class BatchErrorOut(BaseModel):
    code: str | None = None
    line: int | None = None
    message: str | None = None
    param: str | None = None


class BatchErrors(BaseModel):
    object: Literal["list"]
    data: list[BatchErrorOut]


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchOut(BaseModel):
    id: str
    object: Literal["batch"]
    endpoint: str
    model: str | None = None
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                    "cancelled"]
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    metadata: dict[str, str] | None = None


class BatchList(BaseModel):
    object: Literal["list"]
    data: list[BatchOut]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool


def batch_out(b: Batch) -> dict:
    return {"id": b.id, "object": "batch", "endpoint": b.endpoint, "model": b.model,
            "errors": {"object": "list", "data": b.errors} if b.errors else None,
            "input_file_id": b.input_file_id, "completion_window": b.completion_window,
            "status": "cancelling" if b.status == "in_progress" and b.cancelling_at else b.status,
            "output_file_id": b.output_file_id, "error_file_id": b.error_file_id,
            "created_at": epoch(b.created_at), "in_progress_at": epoch(b.in_progress_at),
            "expires_at": epoch(b.created_at + WINDOW), "finalizing_at": epoch(b.finalizing_at),
            "completed_at": epoch(b.completed_at), "failed_at": epoch(b.failed_at), "expired_at": None,
            "cancelling_at": epoch(b.cancelling_at), "cancelled_at": epoch(b.cancelled_at),
            "request_counts": {"total": b.total, "completed": b.completed, "failed": b.failed},
            "metadata": b.batch_metadata}


def _items(b: Batch) -> list[dict]:
    if not b.items_file_id:
        return []
    path = filestore.file_path(b.items_file_id)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _finalize(b: Batch, job: Job | None, session: Session) -> None:
    """Build the output and error files of a batch whose job has ended, and store its final status."""
    now = utcnow()
    b.finalizing_at = b.finalizing_at or now
    created = epoch(b.created_at) or 0
    rows = {r.item_id: r for r in resq.prediction_rows(job.id, session=session)} if job is not None else {}
    cancelled = b.cancelling_at is not None or (job is not None and job.status == "cancelled")
    missing_code = "batch_cancelled" if cancelled else ("batch_failed" if job is None or job.status == "failed"
                                                        else "not_answered")
    out, err = [], [error_line(e["custom_id"], e["code"], e["message"], line=e["line"]) for e in b.line_errors or []]
    for it in _items(b):
        row = rows.get(it["id"])
        if row is None:
            err.append(error_line(it["id"], missing_code, "the batch was cancelled before this request ran"
                                  if cancelled else "this request was not answered: the batch's job "
                                  f"{'failed' if missing_code == 'batch_failed' else 'ended'} first"))
            continue
        line = prediction_line(b.endpoint, it["id"], row, AnswerOptions.from_json(it["answer"]), created=created)
        (out if line["response"]["status_code"] == 200 else err).append(line)
    if out:
        b.output_file_id = store_output_file(session=session, owner_id=b.owner_id, filename=f"{b.id}_output.jsonl",
                                             purpose="batch_output", data=jsonl(out), job_id=b.job_id).id
    if err:
        b.error_file_id = store_output_file(session=session, owner_id=b.owner_id, filename=f"{b.id}_error.jsonl",
                                            purpose="batch_output", data=jsonl(err), job_id=b.job_id).id
    b.completed, b.failed = len(out), len(err)
    if cancelled:
        b.status, b.cancelled_at = "cancelled", now
    elif job is None or job.status == "failed":
        b.status, b.failed_at = "failed", now
        b.errors = (b.errors or []) + [{"code": "job_failed", "line": None, "param": None,
                                        "message": (job.error if job is not None else None)
                                        or "the batch's classify job is gone"}]
    else:
        b.status, b.completed_at = "completed", now


def refresh(b: Batch, session: Session) -> Batch:
    """The batch as it stands: counts from its running job, or finalized (once) when the job has ended."""
    if b.status in FINAL or b.job_id is None:  # ended, or still validating
        return b
    job = session.get(Job, b.job_id)
    if job is not None and job.status not in TERMINAL:
        ok, bad = batchq.prediction_counts(job.id, session=session)
        b.completed, b.failed = ok, bad + len(b.line_errors or [])
        return b
    locked = batchq.get_batch(b.id, session=session, for_update=True)  # one request finalizes it
    if locked is not None and locked.status not in FINAL:
        _finalize(locked, job, session)
        session.commit()
    return locked or b


def batch_or_404(batch_id: str, session: Session, caller: Caller) -> Batch:
    b = batchq.get_batch(batch_id, session=session, owner_id=caller.owner_filter)
    if b is None:
        raise OpenAIError(404, f"No batch found with id '{batch_id}'.", code="batch_not_found")
    return b


def _fail_at_validation(b: Batch, code: str, message: str, line: int | None = None) -> None:
    b.status, b.failed_at = "failed", utcnow()
    b.errors = [{"code": code, "line": line, "message": message, "param": None}]


@router.post("", response_model=BatchOut, responses=openai_errors(400, 401, 404, 422, 503),
             openapi_extra=link("200", to=BATCH_OPERATIONS, batch_id="$response.body#/id"))
def create_batch(body: BatchCreate, session: SessionDep, caller: CallerDep,
                 idempotency_key: IdempotencyKeyHeader = None) -> dict:
    """Start a batch over an uploaded JSONL of requests (`{custom_id, method, url, body}` a line).

    A batch whose file holds no valid request, or names a model that is not there, is created `failed`
    with its `errors`; a bad line alone goes to the error file with its number. With an `Idempotency-Key`,
    the same request again answers the first batch (one classify job, whatever the retries)."""
    fp = fingerprint(body.model_dump(mode="json"))
    if (first := replayed(idempotency_key, "batches", fp, caller, session)) is not None:
        return batch_out(refresh(batch_or_404(first, session, caller), session))
    f = file_or_404(body.input_file_id, session, caller, param="input_file_id")
    b = batchq.add_batch(session=session, owner_id=caller.user_id, endpoint=body.endpoint,
                         completion_window=body.completion_window, input_file_id=f.id, status="validating",
                         batch_metadata=body.metadata, total=0, completed=0, failed=0)
    try:
        remember(idempotency_key, "batches", fp, b.id, caller, session)
    except IntegrityError:  # a concurrent request with the same key made the batch: answer it
        session.rollback()
        first = replayed(idempotency_key, "batches", fp, caller, session)
        if first is None:
            raise
        return batch_out(refresh(batch_or_404(first, session, caller), session))
    try:
        text = filestore.file_path(f.id).read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        _fail_at_validation(b, "invalid_file", f"the input file cannot be read as UTF-8 JSONL ({type(e).__name__})")
        session.commit()
        return batch_out(b)
    parsed = parse_batch(text, body.endpoint)
    b.total, b.failed = parsed.total, len(parsed.errors)
    b.line_errors = [e.to_json() for e in parsed.errors]
    if not parsed.lines:
        _fail_at_validation(b, "empty_file" if not parsed.errors else "no_valid_requests",
                            "the input file holds no requests" if not parsed.errors else
                            f"no line of the input file is a valid request (line {parsed.errors[0].line}: "
                            f"{parsed.errors[0].message})", parsed.errors[0].line if parsed.errors else None)
        session.commit()
        return batch_out(b)
    first = parsed.lines[0]
    try:
        model = resolve_model(first.request.answer.model, session, caller)
        items = [{"id": ln.custom_id, "text": ln.request.texts[0], "answer": ln.request.answer.to_json()}
                 for ln in parsed.lines if len(ln.request.texts) == 1]
        b.model = model.name
        b.items_file_id = f"{b.id}.items.jsonl"
        stored = filestore.store_chunks(b.items_file_id, [jsonl(items)], max_bytes=max(1, len(jsonl(items))))
        spec = classify_spec(first.request, model, input_file=str(stored.path),
                             extra=generation_options(json.loads(text.splitlines()[first.line - 1])["body"]))
    except OpenAIError as e:
        _fail_at_validation(b, e.code or "invalid_request", str(e.detail), first.line)
        session.commit()
        return batch_out(b)
    session.commit()  # the batch first (still validating): a broker failure below takes both back
    try:
        job = submit_classify(spec, session, caller)
    except OpenAIError:
        keyq.forget_object(session=session, scope="batches", object_id=b.id)
        session.delete(b)
        session.commit()
        filestore.remove(f"{b.id}.items.jsonl")
        raise
    b.job_id, b.status, b.in_progress_at = job.id, "in_progress", utcnow()
    session.commit()
    return batch_out(b)


@router.get("", response_model=BatchList, responses=openai_errors(401, 422, 503),
            openapi_extra=link("200", to=BATCH_OPERATIONS, batch_id="$response.body#/data/0/id"))
def list_batches(session: SessionDep, caller: CallerDep, after: str | None = Query(None, max_length=40),
                 limit: int = Query(20, ge=1, le=100)) -> dict:
    rows, has_more = batchq.list_batches(session=session, owner_id=caller.owner_filter, after=after, limit=limit)
    return cursor_page([batch_out(refresh(b, session)) for b in rows], has_more=has_more)


@router.get("/{batch_id}", response_model=BatchOut, responses=openai_errors(401, 404, 422, 503))
def retrieve_batch(batch_id: str, session: SessionDep, caller: CallerDep) -> dict:
    return batch_out(refresh(batch_or_404(batch_id, session, caller), session))


@router.post("/{batch_id}/cancel", response_model=BatchOut, responses=openai_errors(401, 404, 422, 503))
def cancel_batch(batch_id: str, session: SessionDep, caller: CallerDep) -> dict:
    """Stop a batch: what its job answered so far is kept in the output file, the rest goes to the error
    file (`batch_cancelled`). A batch that has already ended is answered unchanged."""
    b = refresh(batch_or_404(batch_id, session, caller), session)
    if b.status not in FINAL and b.cancelling_at is None:  # an ended batch is answered as it is
        b.cancelling_at = utcnow()
        session.commit()
        if b.job_id is not None:
            cancel_job(b.job_id, session)
        b = refresh(b, session)
    return batch_out(b)
