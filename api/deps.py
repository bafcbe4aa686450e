"""What the routes depend on: one database session per request (`SessionDep`) and who is calling (`CallerDep`).

A route declares both in its signature, so it reads as what it does and who may do it (the fastapi
full-stack template's `api/deps.py`: `SessionDep`, `CurrentUser`).
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated, Iterator

from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session

from api.listen import beyond_loopback, is_loopback, listening_addresses
from core.settings import get_settings
from db import auth
from db.models import User
from db.session import session_scope


def get_session() -> Iterator[Session]:
    """One session per request: committed when the route returns, rolled back if it raises."""
    with session_scope() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


@dataclass(frozen=True)
class Caller:
    """Who sent a request: a user of the store (`db/auth.py`) and their role.

    `single_user` is the mode of an API that listens on loopback only with no token configured: one local
    user (an admin) who may do anything the machine lets them. With any token configured (the bootstrap
    `NEWSLORA_API_TOKEN` or one made by `newslora tokens create`), every request needs one, loopback too.
    """

    user_id: int
    name: str
    role: str  # "admin" | "member"
    single_user: bool = False

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def owner_filter(self) -> int | None:
        """The owner id a query must filter on (None: an admin sees everything)."""
        return None if self.is_admin else self.user_id

    def may_see(self, owner_id: int | None) -> bool:
        """Whether this caller may see an object owned by `owner_id` (a member: only their own)."""
        return self.is_admin or owner_id == self.user_id


UNAUTHORIZED_DETAIL = "missing or wrong bearer token"
NO_TOKENS_BEYOND_LOOPBACK = ("this API listens beyond loopback ({where}) and no token is configured: it serves "
                             "nobody. Set NEWSLORA_API_TOKEN (the first admin) and restart, or listen on 127.0.0.1")


def reachable_addresses() -> list[str]:
    """The addresses this API process listens on that other machines can reach, asked of the kernel at each
    call (about a millisecond; only asked while no token is configured). Where the kernel cannot tell (not
    Linux, or the app served in-process without a socket), the configured host decides."""
    addrs = listening_addresses()
    if not addrs:
        s = get_settings()
        return [] if is_loopback(s.api_host) else [f"{s.api_host or '0.0.0.0'}:{s.api_port}"]
    return beyond_loopback(addrs)


def _bearer(request: Request) -> str | None:
    given = request.headers.get("authorization")
    if given is None:
        return None
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(401, UNAUTHORIZED_DETAIL, headers={"WWW-Authenticate": "Bearer"})
    return token.strip()


def _caller(user: User, *, single_user: bool = False) -> Caller:
    return Caller(user_id=user.id, name=user.name, role=user.role, single_user=single_user)


def authenticate(request: Request) -> Caller:
    """The caller of a request, or 401 (`WWW-Authenticate: Bearer`) / 403.

    With a token configured anywhere, every request needs a live one (compared in constant time: the
    bootstrap token with `secrets.compare_digest`, stored tokens by their SHA-256). Without any, the API
    serves only when it listens on loopback alone (single-user mode), and refuses everything otherwise.

    Raises:
        HTTPException: 401, the token is missing or wrong; 403, no tokens and reachable beyond loopback.
    """
    cached = getattr(request.state, "caller", None)
    if cached is not None:
        return cached
    s = get_settings()
    token = _bearer(request)
    with session_scope() as session:
        configured = bool(s.api_token) or auth.any_live_tokens(session=session)
        if token is not None and configured:
            if s.api_token and secrets.compare_digest(token.encode(), s.api_token.encode()):
                user = auth.ensure_user(auth.BOOTSTRAP_ADMIN, role="admin", session=session)
            else:
                user = auth.user_for_token(token, session=session)
            if user is None:
                raise HTTPException(401, UNAUTHORIZED_DETAIL, headers={"WWW-Authenticate": "Bearer"})
            caller = _caller(user)
        elif configured:
            raise HTTPException(401, UNAUTHORIZED_DETAIL, headers={"WWW-Authenticate": "Bearer"})
        else:
            # Single-user mode. A bearer token sent anyway is ignored (clients such as the openai SDK always
            # send one): with no token configured there is nothing to check it against.
            reach = reachable_addresses()
            if reach:
                raise HTTPException(403, NO_TOKENS_BEYOND_LOOPBACK.format(where=", ".join(reach)))
            caller = _caller(auth.ensure_user(auth.LOCAL_USER, role="admin", session=session), single_user=True)
    request.state.caller = caller
    return caller


# Every data route declares it. The `guard` middleware (api/app.py) runs the same check on every request
# before routing and before any body is read, so unknown paths and the schema are refused alike.
CallerDep = Annotated[Caller, Depends(authenticate)]


def require_admin(caller: CallerDep) -> Caller:
    if not caller.is_admin:
        raise HTTPException(403, "only an admin may do this")
    return caller


AdminDep = Annotated[Caller, Depends(require_admin)]
