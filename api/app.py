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

from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError as DBError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from api.dashboard import is_public_path as dashboard_public_path, router as dashboard_router
from api.deps import authenticate, is_loopback
from api.routers import datasets, evaluations, health, jobs, models
from api.schemas import errors
from core.settings import get_settings
from db.session import init_db

log = logging.getLogger("newslora.api")


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


app = FastAPI(title="newslora", version="0.1.0", lifespan=lifespan, responses=errors(401),
              description="Submit classification batches, fine-tune jobs and pipelines; read their results.")
app.add_middleware(BodyLimit)  # added before `guard`, so it runs inside it
app.include_router(health.router)
app.include_router(jobs.router)
app.include_router(datasets.router)
app.include_router(models.router)
app.include_router(evaluations.router)
app.include_router(dashboard_router)  # /dashboard: jobs, evaluations, predictions (api/dashboard)


# ---------------------------------------------------------------- cross-cutting

@app.middleware("http")
async def guard(request: Request, call_next):
    # The caller check (api/deps.py) runs here too, before routing and before a byte of body is read: an
    # unknown path, the schema and the docs are refused alike. The dashboard's shell and static files hold
    # no data: they load without a token (their script sends it).
    if not dashboard_public_path(request.method, request.url.path):
        try:
            authenticate(request)
        except HTTPException as e:
            return JSONResponse({"detail": e.detail}, status_code=e.status_code, headers=e.headers)
    s = get_settings()
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
    return await http_exception_handler(request, exc)


@app.exception_handler(DBError)
async def _db_down(_request: Request, exc: DBError):
    log.warning("database unavailable: %s", type(exc.orig).__name__ if exc.orig else exc)
    return JSONResponse({"detail": "the database is unavailable; try again shortly"}, status_code=503)


@app.exception_handler(Exception)
async def _internal(_request: Request, exc: Exception):
    log.exception("internal error")
    return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the API log"}, status_code=500)
