"""`/v1/models`: the base models (configs/models presets) and the fine-tunes the caller may see (adapters,
named `ft:<base>:newslora:<suffix>:<adapter id>`, api/routers/openai/naming.py), each fine-tune with its
base as `parent`. A fine-tune's owner may delete it.
"""
from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel

from api.deps import CallerDep, SessionDep
from api.routers.links import link
from api.routers.openai.errors import OpenAIError, openai_errors
from api.routers.openai.serving import ServedModel, base_models, resolve_model, served_adapter
from db import results as resq

router = APIRouter(prefix="/v1/models", tags=["openai"])

MODEL_OPERATIONS = {"model": ("GET", "/v1/models/{model}"), "delete": ("DELETE", "/v1/models/{model}")}
OWNER = "newslora"


class ModelObject(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelObject]


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"]
    deleted: bool


def model_object(m: ServedModel) -> dict:
    return {"id": m.name, "object": "model", "created": m.created,
            "owned_by": OWNER if m.adapter_id is None else f"user-{m.owner_id}" if m.owner_id else OWNER,
            "parent": m.parent}


@router.get("", response_model=ModelList, responses=openai_errors(401, 503),
            openapi_extra=link("200", to=MODEL_OPERATIONS, model="$response.body#/data/0/id"))
def list_models(session: SessionDep, caller: CallerDep) -> dict:
    """The fine-tunes the caller may see (newest first), then every base model. One page: OpenAI's shape."""
    adapters = [a for a in resq.list_artifacts(session=session, limit=10_000, owner_id=caller.owner_filter)
                if a.kind == "adapter"]
    return {"object": "list", "data": [model_object(served_adapter(a, session)) for a in adapters] +
            [model_object(m) for m in base_models()]}


@router.get("/{model}", response_model=ModelObject, responses=openai_errors(401, 404, 422, 503))
def retrieve_model(model: str, session: SessionDep, caller: CallerDep) -> dict:
    return model_object(resolve_model(model, session, caller))


@router.delete("/{model}", response_model=ModelDeleted, responses=openai_errors(401, 403, 404, 422, 503))
def delete_model(model: str, session: SessionDep, caller: CallerDep) -> dict:
    """Delete a fine-tune (its registration; the adapter's files stay for jobs that use them): its owner or an
    admin."""
    served = resolve_model(model, session, caller)
    if served.adapter_id is None:
        raise OpenAIError(403, f"{model} is a base model: only fine-tunes can be deleted", param="model",
                          code="model_not_deletable")
    if not caller.is_admin and (served.owner_id is None or served.owner_id != caller.user_id):
        raise OpenAIError(403, f"only the owner of {model} (or an admin) may delete it", code="not_owner")
    art = resq.get_artifact(served.adapter_id, session=session)
    session.delete(art)
    session.commit()
    return {"id": model, "object": "model", "deleted": True}
