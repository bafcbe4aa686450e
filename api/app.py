"""The HTTP API. Run with `newslora up` (embedded) or `uvicorn api.app:app` (deployment).

Every route needs `Authorization: Bearer <NEWSLORA_API_TOKEN>` when the API listens on anything but
loopback. Errors are JSON `{"detail": "one sentence"}` (a 422's `detail` is a list of `{loc, msg, type}`),
each status documented on each route in the OpenAPI schema; never a stack trace.
"""
from __future__ import annotations

import ipaddress
import logging
import secrets
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Path as PathParam, Query, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from kombu.exceptions import OperationalError as BrokerError
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError, OperationalError as DBError
from sqlalchemy import text
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from api.dashboard import is_public_path as dashboard_public_path, router as dashboard_router
from api.schemas import (IDEMPOTENCY_KEY_PATTERN, MAX_ID, MAX_OFFSET, DatasetOut, ErrorOut, EvaluationList,
                         EvaluationOut, EventOut, JobCreate, JobKind, JobList, JobOut, JobStatus, ModelOut,
                         PredictionOut, PredictionPage, ValidationErrorOut)
from core.settings import get_settings
from db import jobs as jobq
from db import results as resq
from db.models import Job
from db.session import init_db, session_scope
from core.specs import QUEUES, parse_spec
from core.version import code_version

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


# What each error status means here; every route documents the ones it can answer (see `errors`).
ERROR_MEANINGS: dict[int, str] = {
    400: "The body is not JSON (or not UTF-8).",
    401: "Missing or wrong `Authorization: Bearer` token (required when the API listens beyond loopback).",
    403: "A dataset, input or model path lies outside the allowed data folders (NEWSLORA_DATA_ROOTS).",
    404: "No row with that id.",
    409: "The request conflicts with the row's state (or with an earlier use of the idempotency key).",
    413: "The request body is over NEWSLORA_MAX_BODY_BYTES.",
    422: "A parameter or field is invalid: one entry per problem, naming where and what.",
    503: "The database (or, at submission, the broker) is unavailable; nothing was written, try again shortly.",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route: each error status it can answer, with its body model."""
    return {code: {"model": ValidationErrorOut if code == 422 else ErrorOut, "description": ERROR_MEANINGS[code]}
            for code in codes}


# A row id in a path and an offset in a query, bounded by what the store can hold: beyond, a 422, not a 500.
RowId = Annotated[int, PathParam(ge=1, le=MAX_ID, description="A row id.")]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="How many rows to skip.")]

app = FastAPI(title="newslora", version="0.1.0", lifespan=lifespan, responses=errors(401),
              description="Submit classification batches, fine-tune jobs and pipelines; read their results.")
app.add_middleware(BodyLimit)  # added before `guard`, so it runs inside it
app.include_router(dashboard_router)  # /dashboard: jobs, evaluations, predictions (api/dashboard)


# ---------------------------------------------------------------- cross-cutting

@app.middleware("http")
async def guard(request: Request, call_next):
    s = get_settings()
    # A token is required beyond loopback; on loopback a token that is set is still checked when sent.
    # The dashboard's shell and static files hold no data: they load without one (their script sends it).
    public = dashboard_public_path(request.method, request.url.path)
    if not public and ((not is_loopback(s.api_host)) or (s.api_token and request.headers.get("authorization"))):
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


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    # Starlette's 405 lists only the methods of the first route that matched the path (`Allow: POST` for
    # /jobs, which also answers GET): list every method any route serves at this path.
    if exc.status_code == 405:
        allowed = sorted({m for r in request.app.router.routes if getattr(r, "methods", None)
                          and r.matches(request.scope)[0] != Match.NONE for m in r.methods})
        exc = StarletteHTTPException(405, exc.detail, headers={**(exc.headers or {}), "Allow": ", ".join(allowed)})
    return await http_exception_handler(request, exc)


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
    except (OSError, RuntimeError, ValueError):  # ValueError: a NUL byte in the path
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

@app.get("/health", responses=errors(503))
def health() -> dict[str, Any]:
    with session_scope() as s:
        s.execute(text("SELECT 1"))
    s = get_settings()
    return {"ok": True, "code_version": code_version(), "embedded": s.embedded, "home": str(s.home)}


def _idempotency_key(body: JobCreate, header: str | None) -> str | None:
    """The key from the `Idempotency-Key` header or the body field (both may be given, if equal)."""
    if header is not None and body.idempotency_key is not None and header != body.idempotency_key:
        raise RequestValidationError([{"loc": ["header", "Idempotency-Key"], "type": "value_error",
                                       "msg": "differs from the body's idempotency_key: send one key"}])
    return header if header is not None else body.idempotency_key


def _replay(key: str, kind: str, spec_json: dict[str, Any], parent_id: int | None, s: Session) -> JSONResponse | None:
    """The first job submitted with `key` (HTTP 200) if the submission is the same; 409 naming it if not."""
    existing = jobq.find_by_idempotency_key(key, session=s)
    if existing is None:
        return None
    if (existing.kind, existing.spec, existing.parent_id) != (kind, spec_json, parent_id):
        raise HTTPException(409, f"idempotency key {key!r} was already used by job {existing.id} "
                                 f"({existing.kind}) with a different submission; send a new key, "
                                 f"or GET /jobs/{existing.id}")
    return JSONResponse(job_out(existing, s).model_dump(mode="json"), status_code=200)


@app.post("/jobs", response_model=JobOut, status_code=201,
          responses={200: {"model": JobOut, "description": "The job first submitted with this idempotency key "
                                                              "(the same submission): nothing new was created."},
                     **errors(400, 403, 404, 409, 413, 422, 503)})
def create_job(body: JobCreate, request: Request,
               idempotency_key: Annotated[str | None, Header(
                   alias="Idempotency-Key", min_length=1, max_length=200, pattern=IDEMPOTENCY_KEY_PATTERN,
                   description="A retry with the same key and submission returns the first job (200); "
                               "the same key with a different submission answers 409.")] = None) -> JSONResponse:
    key = _idempotency_key(body, idempotency_key)
    try:
        spec = parse_spec(body.kind, body.spec)
    except ValidationError as e:
        raise HTTPException(422, [{"loc": list(err["loc"]), "msg": err["msg"], "type": err["type"]}
                                  for err in e.errors(include_url=False, include_input=False)]) from None
    _check_paths(body.kind, spec)
    queue = spec.queue if body.kind == "noop" else QUEUES[body.kind]
    spec_json = spec.model_dump(mode="json")
    try:
        with session_scope() as s:
            if key and (replay := _replay(key, body.kind, spec_json, body.parent_id, s)) is not None:
                return replay
            if body.parent_id is not None:
                jobq.get_job(body.parent_id, session=s)
            job = jobq.create_job(session=s, kind=body.kind, queue=queue, spec=spec_json, parent_id=body.parent_id,
                                  idempotency_key=key, code_version=code_version())
            job_id = job.id
    except jobq.JobNotFound as e:
        raise HTTPException(404, str(e)) from None
    except IntegrityError:  # a concurrent submission with the same key won
        with session_scope() as s:
            replay = _replay(key, body.kind, spec_json, body.parent_id, s) if key else None
            if replay is None:
                raise
            return replay
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


@app.get("/jobs", response_model=JobList, responses=errors(422, 503))
def list_jobs(kind: JobKind | None = None, status: JobStatus | None = None,
              parent_id: int | None = Query(None, ge=1, le=MAX_ID),
              limit: int = Query(50, ge=1, le=500), offset: Offset = 0,
              s: Session = Depends(db)) -> JobList:
    rows, total = jobq.list_jobs(session=s, kind=kind, status=status, parent_id=parent_id, limit=limit,
                                 offset=offset)
    return JobList(items=[job_out(j, s) for j in rows], total=total, limit=limit, offset=offset)


ROW_ERRORS = errors(404, 422, 503)  # a route that reads one row by its id


def _job_or_404(job_id: int, s: Session) -> Job:
    try:
        return jobq.get_job(job_id, session=s)
    except jobq.JobNotFound as e:
        raise HTTPException(404, str(e)) from None


@app.get("/jobs/{job_id}", response_model=JobOut, responses=ROW_ERRORS)
def get_job(job_id: RowId, s: Session = Depends(db)) -> JobOut:
    return job_out(_job_or_404(job_id, s), s)


@app.post("/jobs/{job_id}/cancel", response_model=JobOut, responses=errors(404, 409, 422, 503))
def cancel_job(job_id: RowId, s: Session = Depends(db)) -> JobOut:
    _job_or_404(job_id, s)
    try:
        job = jobq.request_cancel(job_id, session=s)
    except jobq.JobStateConflict as e:
        raise HTTPException(409, str(e)) from None
    s.commit()
    if job.kind == "pipeline" or (job.kind == "classify" and jobq.children(job_id, session=s)):
        # A pipeline waiting between its stages (or a classify job waiting for its shards) has no task
        # running to see the cancel: advancing it ends it now and cascades to its children.
        from broker.app import enqueue_advance
        try:
            enqueue_advance(job_id)
        except Exception:  # noqa: BLE001 - the reaper advances it within two leases anyway
            log.warning("cancel of job %s: could not enqueue its advance; the reaper will", job_id)
    return job_out(job, s)


@app.get("/jobs/{job_id}/events", response_model=list[EventOut], responses=ROW_ERRORS)
def job_events(job_id: RowId, after_id: int = Query(0, ge=0, le=MAX_ID), limit: int = Query(200, ge=1, le=1000),
               s: Session = Depends(db)) -> list[EventOut]:
    _job_or_404(job_id, s)
    return [EventOut.model_validate(e) for e in jobq.events(job_id, session=s, after_id=after_id, limit=limit)]


@app.get("/jobs/{job_id}/predictions", response_model=PredictionPage, responses=ROW_ERRORS)
def job_predictions(job_id: RowId, offset: Offset = 0, limit: int = Query(100, ge=1, le=5000),
                    failed: bool | None = None, s: Session = Depends(db)) -> PredictionPage:
    _job_or_404(job_id, s)
    rows, total = resq.predictions(job_id, session=s, offset=offset, limit=limit, failed=failed)
    return PredictionPage(items=[PredictionOut.model_validate(p) for p in rows], total=total, limit=limit,
                          offset=offset)


@app.get("/jobs/{job_id}/predictions.jsonl", response_class=Response,  # Response: errors stay documented as JSON
         responses={200: {"content": {"application/x-ndjson": {"schema": {"type": "string"}}},
                          "description": "One prediction per line, as JSON."}, **ROW_ERRORS})
def job_predictions_jsonl(job_id: RowId, s: Session = Depends(db)) -> PlainTextResponse:
    import json
    _job_or_404(job_id, s)
    lines = [json.dumps(p) for p in resq.all_predictions(job_id, session=s)]
    return PlainTextResponse("\n".join(lines) + ("\n" if lines else ""), media_type="application/x-ndjson")


@app.get("/jobs/{job_id}/judge_scores", responses=ROW_ERRORS)
def job_judge_scores(job_id: RowId, s: Session = Depends(db)) -> list[dict[str, Any]]:
    _job_or_404(job_id, s)
    return resq.judge_scores(job_id, session=s)


@app.get("/datasets", response_model=list[DatasetOut], responses=errors(422, 503))
def list_datasets(limit: int = Query(50, ge=1, le=500), offset: Offset = 0,
                  s: Session = Depends(db)) -> list[DatasetOut]:
    return [DatasetOut.model_validate(d) for d in resq.list_datasets(session=s, limit=limit, offset=offset)]


@app.get("/datasets/{dataset_id}", response_model=DatasetOut, responses=ROW_ERRORS)
def get_dataset(dataset_id: RowId, s: Session = Depends(db)) -> DatasetOut:
    ds = resq.get_dataset(dataset_id, session=s)
    if ds is None:
        raise HTTPException(404, f"no dataset with id {dataset_id}")
    return DatasetOut.model_validate(ds)


@app.get("/models", response_model=list[ModelOut], responses=errors(422, 503))
def list_models(limit: int = Query(50, ge=1, le=500), offset: Offset = 0,
                s: Session = Depends(db)) -> list[ModelOut]:
    return [ModelOut.model_validate(m) for m in resq.list_artifacts(session=s, limit=limit, offset=offset)]


@app.get("/models/{model_id}", response_model=ModelOut, responses=ROW_ERRORS)
def get_model(model_id: RowId, s: Session = Depends(db)) -> ModelOut:
    art = resq.get_artifact(model_id, session=s)
    if art is None:
        raise HTTPException(404, f"no model artifact with id {model_id}")
    return ModelOut.model_validate(art)


@app.get("/models/{model_id}/exports", response_model=list[ModelOut], responses=ROW_ERRORS)
def list_exports(model_id: RowId, s: Session = Depends(db)) -> list[ModelOut]:
    """The registered exports of an adapter (`newslora export`), newest first, each with its verification."""
    art = resq.get_artifact(model_id, session=s)
    if art is None or art.kind != "adapter":
        raise HTTPException(404, f"no adapter with id {model_id}")
    return [ModelOut.model_validate(r) for r in resq.exports_of(model_id, session=s)]


@app.get("/models/{model_id}/download", response_class=Response,
         responses={200: {"content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}},
                          "description": "The export's folder as a tar.gz, streamed."}, **errors(404, 409, 422, 503)})
def download_export(model_id: RowId, s: Session = Depends(db)):
    """An export's files as one streamed tar.gz (`newslora exports download ID`)."""
    from fastapi.responses import StreamingResponse
    from workers.export.archive import stream_tar_gz
    art = resq.get_artifact(model_id, session=s)
    if art is None or art.kind != "export":
        raise HTTPException(404, f"no export with id {model_id}: list an adapter's exports with "
                                 f"GET /models/{{adapter_id}}/exports")
    folder = Path(art.path)
    if not folder.is_dir():
        raise HTTPException(409, f"export {model_id}'s folder {folder} is gone from the server; export again")
    name = f"newslora-export-{model_id}"
    return StreamingResponse(stream_tar_gz(folder, name), media_type="application/gzip",
                             headers={"Content-Disposition": f'attachment; filename="{name}.tar.gz"'})


@app.get("/evaluations", response_model=EvaluationList, responses=errors(422, 503))
def list_evaluations(limit: int = Query(50, ge=1, le=500), offset: Offset = 0,
                     s: Session = Depends(db)) -> EvaluationList:
    rows, total = resq.list_evaluations(session=s, limit=limit, offset=offset)
    return EvaluationList(items=[EvaluationOut.model_validate(e) for e in rows], total=total)


@app.get("/evaluations/{eval_id}", response_model=EvaluationOut, responses=ROW_ERRORS)
def get_evaluation(eval_id: RowId, s: Session = Depends(db)) -> EvaluationOut:
    ev = resq.get_evaluation(eval_id, session=s)
    if ev is None:
        raise HTTPException(404, f"no evaluation with id {eval_id}")
    return EvaluationOut.model_validate(ev)
