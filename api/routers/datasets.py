"""Datasets: what prep jobs produced (records, label map, hash)."""
from __future__ import annotations

from fastapi import APIRouter, HTTPException, Query

from api.deps import CallerDep, SessionDep
from api.routers.links import link
from api.schemas import ROW_ERRORS, DatasetOut, Offset, RowId, errors
from db import results as resq

router = APIRouter(prefix="/datasets", tags=["datasets"])


@router.get("", response_model=list[DatasetOut], responses=errors(422, 503),
            openapi_extra=link("200", to={"dataset": ("GET", "/datasets/{dataset_id}")},
                               dataset_id="$response.body#/0/id"))
def list_datasets(session: SessionDep, caller: CallerDep, limit: int = Query(50, ge=1, le=500),
                  offset: Offset = 0) -> list[DatasetOut]:
    rows = resq.list_datasets(session=session, limit=limit, offset=offset, owner_id=caller.owner_filter)
    return [DatasetOut.model_validate(d) for d in rows]


@router.get("/{dataset_id}", response_model=DatasetOut, responses=ROW_ERRORS)
def get_dataset(dataset_id: RowId, session: SessionDep, caller: CallerDep) -> DatasetOut:
    ds = resq.get_dataset(dataset_id, session=session, owner_id=caller.owner_filter)
    if ds is None:
        raise HTTPException(404, f"no dataset with id {dataset_id}")
    return DatasetOut.model_validate(ds)
