"""The dashboard's routes: one static shell page, its script and style, and server-rendered fragments.

The shell (`/dashboard/...`) holds no data, so it loads without a token; its script fetches the page's
fragment (`/dashboard/fragments/...`) with the token the user typed (kept in sessionStorage, sent as
`Authorization: Bearer`), exactly like any other API call. Fragments, the evaluation reports and cancel
(`POST /jobs/{id}/cancel`) therefore follow the API's token rules unchanged, and a browser never sends
credentials on its own (no cookie: nothing to forge from another site).

Fragments are Jinja2 templates with autoescaping on: item texts, job errors and names are shown as text.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

import jinja2
from fastapi import APIRouter, HTTPException, Path as PathParam, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session

from api.dashboard import views
from api.deps import Caller, CallerDep, SessionDep
from api.routers.jobs import job_or_404
from api.schemas import MAX_ID
from db import jobs as jobq
from db import results as resq

HERE = Path(__file__).resolve().parent
STATIC_FILES = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
# The shell runs only its own script; inline scripts and handlers are refused even if markup got in.
SHELL_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
             "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
# Reports are self-contained pages (inline style, PNG data URIs) that never need a script.
REPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"
PAGE_SIZE = 50
# Ids and offsets past 64 bits are refused (422) before they reach the database.
RowId = Annotated[int, PathParam(ge=1, le=MAX_ID)]
Offset = Annotated[int, Query(ge=0, le=MAX_ID)]
EvalId = Annotated[int, Query(ge=1, le=MAX_ID)]


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "–"
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(pct=views.pct, seconds=_fmt_seconds, pretty_json=views.pretty_json,
                       when=lambda d: d.strftime("%Y-%m-%d %H:%M:%S") if d else "–")
    return env


templates = Jinja2Templates(env=_environment())
router = APIRouter(include_in_schema=False)


def is_public_path(method: str, path: str) -> bool:
    """The shell and its static files: served without a token (they hold no data)."""
    if method not in ("GET", "HEAD"):
        return False
    return path in ("/dashboard", "/dashboard/") or (path.startswith("/dashboard/")
                                                     and not path.startswith("/dashboard/fragments/"))


def _fragment(request: Request, name: str, **context: Any) -> HTMLResponse:
    resp = templates.TemplateResponse(request, name, context)
    resp.headers["Cache-Control"] = "no-store"
    return resp


def _blank(v: str | None) -> str | None:
    return v.strip() or None if v is not None else None


# ---------------------------------------------------------------- shell and static files

@router.get("/dashboard/static/{name}")
def static_file(name: str) -> FileResponse:
    if name not in STATIC_FILES:
        raise HTTPException(404, f"no static file {name!r}")
    return FileResponse(HERE / "static" / name, media_type=STATIC_FILES[name],
                        headers={"Cache-Control": "no-cache"})


# ---------------------------------------------------------------- fragments: jobs

def _job_list_context(s: Session, caller: Caller, kind: str | None, status: str | None,
                      offset: int) -> dict[str, Any]:
    kind, status = _blank(kind), _blank(status)
    if status and status not in views.STATUSES:
        raise HTTPException(422, f"status must be one of {', '.join(views.STATUSES)}")
    rows, total = views.job_rows(session=s, kind=kind, status=status, limit=PAGE_SIZE, offset=offset,
                                 owner_id=caller.owner_filter)
    query = urlencode({k: v for k, v in (("kind", kind), ("status", status), ("offset", offset)) if v})
    return {"rows": rows, "total": total, "kind": kind, "status": status, "offset": offset,
            "page_size": PAGE_SIZE, "kinds": views.known_kinds(s, caller.owner_filter), "statuses": views.STATUSES,
            "tree": not (kind or status), "query": query}


@router.get("/dashboard/fragments/jobs")
def jobs_fragment(request: Request, s: SessionDep, caller: CallerDep, kind: str | None = None,
                  status: str | None = None, offset: Offset = 0) -> HTMLResponse:
    return _fragment(request, "jobs.html", **_job_list_context(s, caller, kind, status, offset))


@router.get("/dashboard/fragments/jobs/rows")
def job_rows_fragment(request: Request, s: SessionDep, caller: CallerDep, kind: str | None = None,
                      status: str | None = None, offset: Offset = 0) -> HTMLResponse:
    return _fragment(request, "_job_rows.html", **_job_list_context(s, caller, kind, status, offset))


def _job_context(job_id: int, s: Session, caller: Caller) -> dict[str, Any]:
    job = job_or_404(job_id, s, caller)
    return {"row": views.job_row(job), "job": job,
            "children": [views.job_row(c) for c in jobq.children(job.id, session=s)],
            "charts": views.training_curves(job, session=s),
            "evaluation": resq.evaluation_by_job(job.id, session=s) if job.kind == "evaluate" else None}


@router.get("/dashboard/fragments/jobs/{job_id:int}")
def job_fragment(request: Request, job_id: RowId, s: SessionDep, caller: CallerDep) -> HTMLResponse:
    return _fragment(request, "job.html", **_job_context(job_id, s, caller))


@router.get("/dashboard/fragments/jobs/{job_id:int}/summary")
def job_summary_fragment(request: Request, job_id: RowId, s: SessionDep, caller: CallerDep) -> HTMLResponse:
    return _fragment(request, "_job_summary.html", **_job_context(job_id, s, caller))


@router.get("/dashboard/fragments/jobs/{job_id:int}/predictions")
def predictions_fragment(request: Request, job_id: RowId, s: SessionDep, caller: CallerDep, wrong: bool = False,
                         gold: str | None = None, predicted: str | None = None,
                         min_conf: float | None = Query(None, ge=0, le=1),
                         max_conf: float | None = Query(None, ge=0, le=1), offset: Offset = 0,
                         limit: int = Query(PAGE_SIZE, ge=1, le=500)) -> HTMLResponse:
    job = job_or_404(job_id, s, caller)
    if job.kind != "classify":
        raise HTTPException(404, f"job {job_id} is a {job.kind} job; predictions belong to classify jobs")
    flt = views.PredictionFilter(wrong=wrong, gold=_blank(gold), predicted=_blank(predicted), min_conf=min_conf,
                                 max_conf=max_conf)
    page = views.prediction_page(job, flt, session=s, offset=offset, limit=limit)
    params = {"wrong": "1" if wrong else None, "gold": flt.gold, "predicted": flt.predicted,
              "min_conf": min_conf, "max_conf": max_conf, "limit": limit if limit != PAGE_SIZE else None}
    base = urlencode({k: v for k, v in params.items() if v is not None})
    return _fragment(request, "predictions.html", job=job, page=page, flt=flt, offset=offset, limit=limit,
                     base_query=base)


# ---------------------------------------------------------------- fragments: evaluations

@router.get("/dashboard/fragments/evaluations")
def evaluations_fragment(request: Request, s: SessionDep, caller: CallerDep, offset: Offset = 0) -> HTMLResponse:
    rows, total = resq.list_evaluations(session=s, limit=PAGE_SIZE, offset=offset, owner_id=caller.owner_filter)
    return _fragment(request, "evaluations.html", evaluations=rows, total=total, offset=offset,
                     page_size=PAGE_SIZE, summary=views.evaluation_summary)


@router.get("/dashboard/fragments/evaluations/compare")
def compare_fragment(request: Request, a: EvalId, b: EvalId, s: SessionDep, caller: CallerDep,
                     ma: str | None = None, mb: str | None = None) -> HTMLResponse:
    evs = []
    for eid in (a, b):
        ev = resq.get_evaluation(eid, session=s, owner_id=caller.owner_filter)
        if ev is None:
            raise HTTPException(404, f"no evaluation with id {eid}")
        evs.append(ev)
    try:
        side_a = views.side(evs[0], _blank(ma), views.COLOURS[0])
        side_b = views.side(evs[1], _blank(mb), views.COLOURS[1])
    except LookupError as e:
        raise HTTPException(409, str(e)) from None
    cmp = views.compare(side_a, side_b, session=s)
    return _fragment(request, "compare.html", cmp=cmp, confusion=views.confusion_cells,
                     models_a=views.model_names(evs[0]), models_b=views.model_names(evs[1]))


# ---------------------------------------------------------------- reports (served by the API, downloadable)

@router.get("/evaluations/{eval_id}/report")
def evaluation_report(eval_id: RowId, s: SessionDep, caller: CallerDep, download: bool = False) -> Response:
    ev = resq.get_evaluation(eval_id, session=s, owner_id=caller.owner_filter)
    if ev is None:
        raise HTTPException(404, f"no evaluation with id {eval_id}")
    try:
        body = views.report_html(ev)
    except ValueError as e:  # a document without models cannot be rendered
        raise HTTPException(409, f"evaluation {eval_id} has no report: {e}") from None
    headers = {"Content-Security-Policy": REPORT_CSP, "X-Content-Type-Options": "nosniff",
               "Cache-Control": "no-store"}
    if download:
        headers["Content-Disposition"] = f'attachment; filename="evaluation-{eval_id}-report.html"'
    return HTMLResponse(body, headers=headers)


# ---------------------------------------------------------------- the shell (last: it takes every other path)

@router.get("/dashboard")
@router.get("/dashboard/{page:path}")
def shell(page: str = "") -> FileResponse:
    if page.startswith(("fragments/", "static/")):
        raise HTTPException(404, f"no dashboard page /dashboard/{page}")
    return FileResponse(HERE / "templates" / "shell.html", media_type="text/html",
                        headers={"Content-Security-Policy": SHELL_CSP, "X-Content-Type-Options": "nosniff",
                                 "Cache-Control": "no-cache"})
