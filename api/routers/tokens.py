"""API tokens (admins only): create one for a user (shown once), list them, revoke them.

Only a token's SHA-256 is stored (db/auth.py); the token itself is in the answer to its creation and
nowhere else, never in a log.
"""
from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Path as PathParam
from pydantic import BaseModel, Field
from sqlalchemy import select

from api.deps import AdminDep, SessionDep
from api.routers.links import link
from api.schemas import UtcTime, errors
from db import auth
from db.models import ApiToken

router = APIRouter(prefix="/tokens", tags=["tokens"])


class TokenCreate(BaseModel):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]*$",
                      description="the user the token is for (created if new)")
    role: Literal["admin", "member"] = Field(default="member",
                                             description="a new user's role (an existing user keeps theirs)")


class TokenOut(BaseModel):
    id: int
    user: str
    role: str
    prefix: str = Field(description="the token's first characters, to tell tokens apart")
    created_at: UtcTime
    revoked_at: UtcTime | None = None


class TokenCreated(TokenOut):
    token: str = Field(description="the token itself: shown this once, store it now")


class Revoked(BaseModel):
    revoked: int


def _out(row: ApiToken, user, cls=TokenOut, **extra) -> TokenOut:
    return cls(id=row.id, user=user.name, role=user.role, prefix=row.prefix, created_at=row.created_at,
               revoked_at=row.revoked_at, **extra)


@router.post("", response_model=TokenCreated, status_code=201, responses=errors(400, 403, 422, 503),
             openapi_extra=link("201", to={"revoke": ("POST", "/tokens/{name_or_id}/revoke")},
                                name_or_id="$response.body#/user"))
def create_token(body: TokenCreate, session: SessionDep, caller: AdminDep) -> TokenCreated:
    user, token = auth.create_token(body.name, role=body.role, session=session)
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == auth.token_hash(token)))
    session.commit()
    return _out(row, user, TokenCreated, token=token)


@router.get("", response_model=list[TokenOut], responses=errors(403, 503),
            openapi_extra=link("200", to={"revoke": ("POST", "/tokens/{name_or_id}/revoke")},
                               name_or_id="$response.body#/0/id"))
def list_tokens(session: SessionDep, caller: AdminDep) -> list[TokenOut]:
    return [_out(t, u) for t, u in auth.list_tokens(session=session)]


@router.post("/{name_or_id}/revoke", response_model=Revoked, responses=errors(403, 404, 422, 503))
def revoke_token(name_or_id: Annotated[str, PathParam(min_length=1, max_length=100)], session: SessionDep,
                 caller: AdminDep) -> Revoked:
    """Revoke one token (by its id) or every live token of a user (by their name)."""
    try:
        n = auth.revoke(name_or_id, session=session)
    except auth.UnknownUser as e:
        raise HTTPException(404, str(e)) from None
    session.commit()
    return Revoked(revoked=n)
