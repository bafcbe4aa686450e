"""The HTTP API. Run with `newslora up` (embedded) or `uvicorn api.app:app` (deployment).

Every route needs `Authorization: Bearer <NEWSLORA_API_TOKEN>` when the API listens on anything but
loopback. Errors are JSON `{"detail": "one sentence"}` (a 422's `detail` is a list of `{loc, msg, type}`),
each status documented on each route in the OpenAPI schema; never a stack trace.

This module makes the app: its lifespan, middleware and exception handlers, and the routers (api/routers/:
one per resource; the dashboard's in api/dashboard/). What a route depends on is in api/deps.py.
"""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from sqlalchemy.exc import OperationalError as DBError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from api.dashboard import is_public_path as dashboard_public_path, router as dashboard_router
from api.deps import authenticate
from api.guards import body_too_large, body_limit, cross_site, host_allowed, secure_html
from api.listen import is_loopback
from api.routers.openai import batches as openai_batches, chat as openai_chat, files as openai_files
from api.routers.openai import fine_tuning as openai_fine_tuning
from api.routers.openai import models as openai_models
from api.routers.openai.errors import is_openai_path, openai_error_response
from api.routers import datasets, evaluations, files, health, jobs, models, tokens
from api.schemas import errors
from core.settings import get_settings
from db import auth
from db.session import init_db, session_scope

log = logging.getLogger("newslora.api")


@asynccontextmanager
async def lifespan(_app: FastAPI):
    s = get_settings()
    init_db()
    if not s.api_token:
        with session_scope() as session:
            tokens = auth.any_live_tokens(session=session)
        if not tokens and not is_loopback(s.api_host):
            raise RuntimeError("the API is set to listen beyond loopback (NEWSLORA_API_HOST) with no token: set "
                               "NEWSLORA_API_TOKEN first")
        if not tokens:
            log.warning("single-user mode: no API token is configured, so the API serves only while it listens on "
                        "loopback alone, and any local path may be named in a job. Set NEWSLORA_API_TOKEN (and "
                        "`newslora tokens create NAME`) to share it with a team.")
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
        limit = body_limit(scope.get("path", ""))
        seen = 0

        async def counted_receive():  # called by the endpoint itself (inside `guard`: no task group between)
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # FastAPI re-raises an HTTPException met while reading the body
                    raise HTTPException(413, body_too_large(limit))
            return message
        await self.app(scope, counted_receive, send)


app = FastAPI(title="newslora", version="0.1.0", lifespan=lifespan, responses=errors(401),
              description="Submit classification batches, fine-tune jobs and pipelines; read their results.")
app.add_middleware(BodyLimit)  # added before `guard`, so it runs inside it
app.include_router(health.router)
app.include_router(jobs.router)
app.include_router(datasets.router)
app.include_router(models.router)
app.include_router(evaluations.router)
app.include_router(files.router)
app.include_router(tokens.router)
app.include_router(openai_fine_tuning.router)  # /v1/fine_tuning
app.include_router(openai_files.router)  # /v1/files
app.include_router(openai_batches.router)  # /v1/batches
app.include_router(openai_models.router)  # /v1/models
app.include_router(openai_chat.router)  # /v1/chat/completions, /v1/completions
app.include_router(dashboard_router)  # /dashboard: jobs, evaluations, predictions (api/dashboard)


# ---------------------------------------------------------------- cross-cutting

@app.middleware("http")
async def guard(request: Request, call_next):
    # The caller check (api/deps.py) runs here too, before routing and before a byte of body is read: an
    # unknown path, the schema and the docs are refused alike. The dashboard's shell and static files hold
    # no data: they load without a token (their script sends it). Before any of it: the Host allow-list and
    # the cross-site check (api/guards.py), so a page on another site gets nothing done.
    if not host_allowed(request.headers.get("host")):
        return secure_html(error_response(request, 403, "this Host is not in NEWSLORA_ALLOWED_HOSTS: use the "
                                                        "API's own name, or ask its admin to add this one"))
    if cross_site(request):
        return secure_html(error_response(request, 403, "a cross-site request may not change anything here "
                                                        "(Origin / Sec-Fetch-Site)"))
    if not dashboard_public_path(request.method, request.url.path):
        try:
            await run_in_threadpool(authenticate, request)  # a store lookup: off the event loop
        except HTTPException as e:
            return error_response(request, e.status_code, e.detail, e.headers)
        except DBError as e:  # tokens live in the store: no store, no caller
            return await _db_down(request, e)
    limit = body_limit(request.url.path)
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        return error_response(request, 413, body_too_large(limit))
    return secure_html(await call_next(request))


def error_response(request: Request, status_code: int, detail: Any, headers: dict[str, str] | None = None,
                   **openai_fields: str | None) -> JSONResponse:
    """The error body for `request`: `{"detail": ...}`, or OpenAI's `{"error": {...}}` under /v1."""
    if is_openai_path(request.url.path):
        return openai_error_response(status_code, detail, headers=headers, **openai_fields)
    return JSONResponse({"detail": detail}, status_code=status_code, headers=headers)


@app.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError):
    # FastAPI's own handler echoes each bad input back, and a body like `1e999999` (inf) then fails to
    # encode as JSON (a 500): answer with where and what, never the input itself.
    return error_response(request, 422, [{"loc": list(err.get("loc", ())), "msg": err.get("msg", ""),
                                          "type": err.get("type", "")} for err in exc.errors()])


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at the request's path (each router asked as it would be routed)."""
    return [method for method in HTTP_METHODS
            if any(route.matches({**request.scope, "method": method})[0] == Match.FULL
                   for route in request.app.router.routes)]


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    # Starlette's 405 lists only the methods of the first route that matched the path (`Allow: POST` for
    # /jobs, which also answers GET): list every method any route serves at this path.
    if exc.status_code == 405:
        allowed = ", ".join(sorted(allowed_methods(request)))
        exc = StarletteHTTPException(405, exc.detail, headers={**(exc.headers or {}), "Allow": allowed})
    if is_openai_path(request.url.path):
        return error_response(request, exc.status_code, exc.detail, exc.headers,
                              param=getattr(exc, "param", None), code=getattr(exc, "code", None))
    return await http_exception_handler(request, exc)


@app.exception_handler(DBError)
async def _db_down(request: Request, exc: DBError):
    log.warning("database unavailable: %s", type(exc.orig).__name__ if exc.orig else exc)
    return error_response(request, 503, "the database is unavailable; try again shortly", {"Retry-After": "2"})


@app.exception_handler(Exception)
async def _internal(request: Request, exc: Exception):
    log.exception("internal error")
    return error_response(request, 500, f"internal error ({type(exc).__name__}); see the API log")
