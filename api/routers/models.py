"""Models: registered adapters and their exports (`newslora export`), and an export's files as a tar.gz."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import Response, StreamingResponse

from api.deps import CallerDep, SessionDep
from api.routers.links import link
from api.schemas import ROW_ERRORS, ModelOut, Offset, RowId, errors
from db import results as resq
from workers.export.archive import stream_tar_gz

router = APIRouter(prefix="/models", tags=["models"])

MODEL_OPERATIONS = {"model": ("GET", "/models/{model_id}"), "exports": ("GET", "/models/{model_id}/exports"),
                    "download": ("GET", "/models/{model_id}/download")}


@router.get("", response_model=list[ModelOut], responses=errors(422, 503),
            openapi_extra=link("200", to=MODEL_OPERATIONS, model_id="$response.body#/0/id"))
def list_models(session: SessionDep, caller: CallerDep, limit: int = Query(50, ge=1, le=500),
                offset: Offset = 0) -> list[ModelOut]:
    rows = resq.list_artifacts(session=session, limit=limit, offset=offset, owner_id=caller.owner_filter)
    return [ModelOut.model_validate(m) for m in rows]


@router.get("/{model_id}", response_model=ModelOut, responses=ROW_ERRORS)
def get_model(model_id: RowId, session: SessionDep, caller: CallerDep) -> ModelOut:
    art = resq.get_artifact(model_id, session=session, owner_id=caller.owner_filter)
    if art is None:
        raise HTTPException(404, f"no model artifact with id {model_id}")
    return ModelOut.model_validate(art)


@router.get("/{model_id}/exports", response_model=list[ModelOut], responses=ROW_ERRORS,
            openapi_extra=link("200", to={"download": MODEL_OPERATIONS["download"]},
                               model_id="$response.body#/0/id"))
def list_exports(model_id: RowId, session: SessionDep, caller: CallerDep) -> list[ModelOut]:
    """The registered exports of an adapter (`newslora export`), newest first, each with its verification."""
    art = resq.get_artifact(model_id, session=session, owner_id=caller.owner_filter)
    if art is None or art.kind != "adapter":
        raise HTTPException(404, f"no adapter with id {model_id}")
    exports = resq.exports_of(model_id, session=session, owner_id=caller.owner_filter)
    return [ModelOut.model_validate(r) for r in exports]


@router.get("/{model_id}/download", response_class=Response,
            responses={200: {"content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}},
                             "description": "The export's folder as a tar.gz, streamed."},
                       **errors(404, 409, 422, 503)})
def download_export(model_id: RowId, session: SessionDep, caller: CallerDep) -> StreamingResponse:
    """An export's files as one streamed tar.gz (`newslora exports download ID`)."""
    art = resq.get_artifact(model_id, session=session, owner_id=caller.owner_filter)
    if art is None or art.kind != "export":
        raise HTTPException(404, f"no export with id {model_id}: list an adapter's exports with "
                                 f"GET /models/{{adapter_id}}/exports")
    folder = Path(art.path)
    if not folder.is_dir():
        raise HTTPException(409, f"export {model_id}'s folder is gone from the server; export again")
    name = f"newslora-export-{model_id}"
    return StreamingResponse(stream_tar_gz(folder, name), media_type="application/gzip",
                             headers={"Content-Disposition": f'attachment; filename="{name}.tar.gz"'})
