"""The HTTP API. Run with `newslora up` (embedded) or `uvicorn api.app:app` (deployment).

Every route needs `Authorization: Bearer <NEWSLORA_API_TOKEN>` when the API listens on anything but
loopback. Errors are JSON `{"detail": ...}` with 404 / 409 / 422 / 503; never a stack trace.
"""
from __future__ import annotations

import ipaddress
import logging
import secrets
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from kombu.exceptions import OperationalError as BrokerError
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError, OperationalError as DBError
from sqlalchemy import text
from sqlalchemy.orm import Session

from api.schemas import (DatasetOut, EvaluationList, EvaluationOut, EventOut, JobCreate, JobList, JobOut,
                         ModelOut, PredictionOut, PredictionPage)
from broker.settings import get_settings
from db import jobs as jobq
from db import results as resq
from db.models import Job
from db.session import init_db, session_scope
from workers.specs import QUEUES, UnknownKind, parse_spec
from workers.version import code_version

log = logging.getLogger("newslora.api")


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@asynccontextmanager
async def lifespan(_app: FastAPI):
    s = get_settings()
    if not is_loopback(s.api_host) and not s.api_token:
        raise RuntimeError("the API listens beyond loopback: set NEWSLORA_API_TOKEN first")
    init_db()
    yield


class BodyLimit:
    """Count request-body bytes as they arrive and refuse the request with 413 past NEWSLORA_MAX_BODY_BYTES.

    `guard` refuses a too-large Content-Length at once; this catches a chunked body (no Content-Length)
    or one longer than it said, before it is buffered whole.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = get_settings().max_body_bytes
        seen = 0

        async def counted_receive():  # called by the endpoint itself (inside `guard`: no task group between)
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # FastAPI re-raises an HTTPException met while reading the body
                    raise HTTPException(413, f"request body over {limit} bytes")
            return message
        await self.app(scope, counted_receive, send)


app = FastAPI(title="newslora", version="0.1.0", lifespan=lifespan,
              description="Submit classification batches, fine-tune jobs and pipelines; read their results.")
app.add_middleware(BodyLimit)  # added before `guard`, so it runs inside it


# ---------------------------------------------------------------- cross-cutting

@app.middleware("http")
async def guard(request: Request, call_next):
    s = get_settings()
    # A token is required beyond loopback; on loopback a token that is set is still checked when sent.
    if (not is_loopback(s.api_host)) or (s.api_token and request.headers.get("authorization")):
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {s.api_token}".encode()):
            return JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > s.max_body_bytes:
        return JSONResponse({"detail": f"request body over {s.max_body_bytes} bytes"}, status_code=413)
    return await call_next(request)


@app.exception_handler(RequestValidationError)
async def _invalid_request(_request: Request, exc: RequestValidationError):
    # FastAPI's own handler echoes each bad input back, and a body like `1e999999` (inf) then fails to
    # encode as JSON (a 500): answer with where and what, never the input itself.
    return JSONResponse({"detail": [{"loc": list(err.get("loc", ())), "msg": err.get("msg", ""),
                                     "type": err.get("type", "")} for err in exc.errors()]}, status_code=422)


@app.exception_handler(DBError)
async def _db_down(_request: Request, exc: DBError):
    log.warning("database unavailable: %s", type(exc.orig).__name__ if exc.orig else exc)
    return JSONResponse({"detail": "the database is unavailable; try again shortly"}, status_code=503)


@app.exception_handler(Exception)
async def _internal(_request: Request, exc: Exception):
    log.exception("internal error")
    return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the API log"}, status_code=500)


def db() -> Session:
    with session_scope() as s:
        yield s


def job_out(job: Job, session: Session) -> JobOut:
    out = JobOut.model_validate(job)
    out.children = [c.id for c in jobq.children(job.id, session=session)]
    return out


def _path_allowed(path: str) -> bool:
    s = get_settings()
    roots = [s.home, *s.data_roots]
    if not s.data_roots and is_loopback(s.api_host):
        return True  # a local user on loopback may read any file they can
    try:
        p = Path(path).expanduser().resolve()
    except (OSError, RuntimeError):
        return False
    return any(p == r.resolve() or r.resolve() in p.parents for r in roots)


def _check_paths(kind: str, spec: Any) -> None:
    """Refuse dataset, input and model paths outside the allowed data folders."""
    paths: list[str] = []
    if kind == "prep":
        paths += [src.path for src in (spec.train, spec.test) if src is not None and src.format != "hub"
                  and ("/" not in src.path or Path(src.path).expanduser().exists() or src.path.startswith((".", "/", "~")))]
    if kind == "classify" and spec.input_file:
        paths.append(spec.input_file)
    if kind == "pipeline":
        paths += [src.path for src in (spec.prep.train, spec.prep.test) if src is not None and
                  src.path.startswith((".", "/", "~"))]
    model = getattr(spec, "model", None)
    if isinstance(model, str) and model.startswith((".", "/", "~")):
        paths.append(model)
    for p in paths:
        if not _path_allowed(p):
            raise HTTPException(403, f"path {p!r} is outside the allowed data folders (NEWSLORA_DATA_ROOTS)")


# ---------------------------------------------------------------- routes

@app.get("/health")
def health() -> dict[str, Any]:
    with session_scope() as s:
        s.execute(text("SELECT 1"))
    s = get_settings()
    return {"ok": True, "code_version": code_version(), "embedded": s.embedded, "home": str(s.home)}


@app.post("/jobs", response_model=JobOut, status_code=201)
def create_job(body: JobCreate, request: Request) -> JSONResponse:
    try:
        spec = parse_spec(body.kind, body.spec)
    except UnknownKind as e:
        raise HTTPException(422, str(e)) from None
    except ValidationError as e:
        raise HTTPException(422, [{"loc": list(err["loc"]), "msg": err["msg"], "type": err["type"]}
                                  for err in e.errors(include_url=False, include_input=False)]) from None
    _check_paths(body.kind, spec)
    queue = spec.queue if body.kind == "noop" else QUEUES[body.kind]
    spec_json = spec.model_dump(mode="json")
    try:
        with session_scope() as s:
            if body.idempotency_key:
                existing = jobq.find_by_idempotency_key(body.idempotency_key, session=s)
                if existing is not None:
                    return JSONResponse(job_out(existing, s).model_dump(mode="json"), status_code=200)
            if body.parent_id is not None:
                jobq.get_job(body.parent_id, session=s)
            job = jobq.create_job(session=s, kind=body.kind, queue=queue, spec=spec_json, parent_id=body.parent_id,
                                  idempotency_key=body.idempotency_key, code_version=code_version())
            job_id = job.id
    except jobq.JobNotFound as e:
        raise HTTPException(404, str(e)) from None
    except IntegrityError:  # a concurrent submission with the same key won
        with session_scope() as s:
            existing = jobq.find_by_idempotency_key(body.idempotency_key, session=s)
            return JSONResponse(job_out(existing, s).model_dump(mode="json"), status_code=200)
    # Commit, then enqueue. If the broker is down, take the row back: nothing half-written.
    from broker.app import enqueue
    try:
        enqueue(job_id, body.kind, queue)
    except (BrokerError, OSError) as e:
        with session_scope() as s:
            s.delete(s.get(Job, job_id))
        log.warning("broker unavailable at submission: %s", type(e).__name__)
        raise HTTPException(503, "the broker is unavailable; the job was not created, try again shortly") from None
    with session_scope() as s:
        return JSONResponse(job_out(jobq.get_job(job_id, session=s), s).model_dump(mode="json"), status_code=201)


@app.get("/jobs", response_model=JobList)
def list_jobs(kind: str | None = None, status: str | None = None, parent_id: int | None = None,
              limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0),
              s: Session = Depends(db)) -> JobList:
    rows, total = jobq.list_jobs(session=s, kind=kind, status=status, parent_id=parent_id, limit=limit,
                                 offset=offset)
    return JobList(items=[job_out(j, s) for j in rows], total=total, limit=limit, offset=offset)


def _job_or_404(job_id: int, s: Session) -> Job:
    try:
        return jobq.get_job(job_id, session=s)
    except jobq.JobNotFound as e:
        raise HTTPException(404, str(e)) from None


@app.get("/jobs/{job_id}", response_model=JobOut)
def get_job(job_id: int, s: Session = Depends(db)) -> JobOut:
    return job_out(_job_or_404(job_id, s), s)


@app.post("/jobs/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: int, s: Session = Depends(db)) -> JobOut:
    _job_or_404(job_id, s)
    try:
        job = jobq.request_cancel(job_id, session=s)
    except jobq.JobStateConflict as e:
        raise HTTPException(409, str(e)) from None
    s.commit()
    return job_out(job, s)


@app.get("/jobs/{job_id}/events", response_model=list[EventOut])
def job_events(job_id: int, after_id: int = Query(0, ge=0), limit: int = Query(200, ge=1, le=1000),
               s: Session = Depends(db)) -> list[EventOut]:
    _job_or_404(job_id, s)
    return [EventOut.model_validate(e) for e in jobq.events(job_id, session=s, after_id=after_id, limit=limit)]


@app.get("/jobs/{job_id}/predictions", response_model=PredictionPage)
def job_predictions(job_id: int, offset: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=5000),
                    failed: bool | None = None, s: Session = Depends(db)) -> PredictionPage:
    _job_or_404(job_id, s)
    rows, total = resq.predictions(job_id, session=s, offset=offset, limit=limit, failed=failed)
    return PredictionPage(items=[PredictionOut.model_validate(p) for p in rows], total=total, limit=limit,
                          offset=offset)


@app.get("/jobs/{job_id}/predictions.jsonl", response_class=PlainTextResponse)
def job_predictions_jsonl(job_id: int, s: Session = Depends(db)) -> PlainTextResponse:
    import json
    _job_or_404(job_id, s)
    lines = [json.dumps(p) for p in resq.all_predictions(job_id, session=s)]
    return PlainTextResponse("\n".join(lines) + ("\n" if lines else ""), media_type="application/x-ndjson")


@app.get("/jobs/{job_id}/judge_scores")
def job_judge_scores(job_id: int, s: Session = Depends(db)) -> list[dict[str, Any]]:
    _job_or_404(job_id, s)
    return resq.judge_scores(job_id, session=s)


@app.get("/datasets", response_model=list[DatasetOut])
def list_datasets(limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0),
                  s: Session = Depends(db)) -> list[DatasetOut]:
    return [DatasetOut.model_validate(d) for d in resq.list_datasets(session=s, limit=limit, offset=offset)]


@app.get("/datasets/{dataset_id}", response_model=DatasetOut)
def get_dataset(dataset_id: int, s: Session = Depends(db)) -> DatasetOut:
    ds = resq.get_dataset(dataset_id, session=s)
    if ds is None:
        raise HTTPException(404, f"no dataset with id {dataset_id}")
    return DatasetOut.model_validate(ds)


@app.get("/models", response_model=list[ModelOut])
def list_models(limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0),
                s: Session = Depends(db)) -> list[ModelOut]:
    return [ModelOut.model_validate(m) for m in resq.list_artifacts(session=s, limit=limit, offset=offset)]


@app.get("/models/{model_id}", response_model=ModelOut)
def get_model(model_id: int, s: Session = Depends(db)) -> ModelOut:
    art = resq.get_artifact(model_id, session=s)
    if art is None:
        raise HTTPException(404, f"no model artifact with id {model_id}")
    return ModelOut.model_validate(art)


@app.get("/evaluations", response_model=EvaluationList)
def list_evaluations(limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0),
                     s: Session = Depends(db)) -> EvaluationList:
    rows, total = resq.list_evaluations(session=s, limit=limit, offset=offset)
    return EvaluationList(items=[EvaluationOut.model_validate(e) for e in rows], total=total)


@app.get("/evaluations/{eval_id}", response_model=EvaluationOut)
def get_evaluation(eval_id: int, s: Session = Depends(db)) -> EvaluationOut:
    ev = resq.get_evaluation(eval_id, session=s)
    if ev is None:
        raise HTTPException(404, f"no evaluation with id {eval_id}")
    return EvaluationOut.model_validate(ev)
