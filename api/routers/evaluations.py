"""Evaluations: the documents evaluate jobs wrote (metrics, intervals, paired tests). Their HTML reports are
served by the dashboard's router (`/evaluations/{eval_id}/report`)."""
from __future__ import annotations

from fastapi import APIRouter, HTTPException, Query

from api.deps import CallerDep, SessionDep
from api.routers.links import link
from api.schemas import ROW_ERRORS, EvaluationList, EvaluationOut, Offset, RowId, errors
from db import results as resq

router = APIRouter(prefix="/evaluations", tags=["evaluations"])


@router.get("", response_model=EvaluationList, responses=errors(422, 503),
            openapi_extra=link("200", to={"evaluation": ("GET", "/evaluations/{eval_id}")},
                               eval_id="$response.body#/items/0/id"))
def list_evaluations(session: SessionDep, caller: CallerDep, limit: int = Query(50, ge=1, le=500),
                     offset: Offset = 0) -> EvaluationList:
    rows, total = resq.list_evaluations(session=session, limit=limit, offset=offset,
                                             owner_id=caller.owner_filter)
    return EvaluationList(items=[EvaluationOut.model_validate(e) for e in rows], total=total)


@router.get("/{eval_id}", response_model=EvaluationOut, responses=ROW_ERRORS)
def get_evaluation(eval_id: RowId, session: SessionDep, caller: CallerDep) -> EvaluationOut:
    ev = resq.get_evaluation(eval_id, session=session, owner_id=caller.owner_filter)
    if ev is None:
        raise HTTPException(404, f"no evaluation with id {eval_id}")
    return EvaluationOut.model_validate(ev)
