"""What the routes depend on: one database session per request (`SessionDep`) and who is calling (`CallerDep`).

A route declares both in its signature, so it reads as what it does and who may do it (the fastapi
full-stack template's `api/deps.py`: `SessionDep`, `CurrentUser`).
"""
from __future__ import annotations

import ipaddress
import secrets
from dataclasses import dataclass
from typing import Annotated, Iterator

from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session

from core.settings import get_settings
from db.session import session_scope


def get_session() -> Iterator[Session]:
    """One session per request: committed when the route returns, rolled back if it raises."""
    with session_scope() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def is_loopback(host: str) -> bool:
    """Whether the API's host is reachable from this machine only ('' and 'localhost' count as loopback)."""
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Caller:
    """Who sent a request. Today there is one shared token (NEWSLORA_API_TOKEN), so a caller is either a
    local one that sent none (allowed on loopback only) or the token's holder."""

    token_checked: bool  # True: the request carried the right bearer token


UNAUTHORIZED_DETAIL = "missing or wrong bearer token"


def authenticate(request: Request) -> Caller:
    """The caller of a request, or 401 (`WWW-Authenticate: Bearer`).

    A token is required beyond loopback; on loopback a token that is set is still checked when sent.

    Raises:
        HTTPException: 401, the token is missing or wrong.
    """
    s = get_settings()
    given = request.headers.get("authorization")
    if is_loopback(s.api_host) and not (s.api_token and given):
        return Caller(token_checked=False)
    if not secrets.compare_digest((given or "").encode(), f"Bearer {s.api_token}".encode()):
        raise HTTPException(401, UNAUTHORIZED_DETAIL, headers={"WWW-Authenticate": "Bearer"})
    return Caller(token_checked=True)


# Every data route declares it. The `guard` middleware (api/app.py) runs the same check on every request
# before routing and before any body is read, so unknown paths and the schema are refused alike.
CallerDep = Annotated[Caller, Depends(authenticate)]
