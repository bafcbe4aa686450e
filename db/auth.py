"""Users and their API tokens. Only a token's SHA-256 is stored; the token is shown once, at creation.

Each query takes the session as a keyword; the caller commits.
"""
from __future__ import annotations

import hashlib
import secrets
from typing import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import ROLES, ApiToken, User, utcnow

TOKEN_PREFIX = "nl-"  # every newslora token starts with this, so a leaked one is recognisable
BOOTSTRAP_ADMIN = "admin"  # the user NEWSLORA_API_TOKEN authenticates as
LOCAL_USER = "local"  # the single user of a loopback API without tokens


class UnknownUser(LookupError):
    pass


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def ensure_user(name: str, *, role: str, session: Session) -> User:
    """The user called `name`, created with `role` if missing (an existing user keeps their role)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        user = User(name=name, role=role)
        session.add(user)
        session.flush()
    return user


def create_token(name: str, *, role: str, session: Session) -> tuple[User, str]:
    """A new token for user `name` (created with `role` if new): returns (user, the token in clear)."""
    user = ensure_user(name, role=role, session=session)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiToken(user_id=user.id, token_hash=token_hash(token), prefix=token[:10]))
    session.flush()
    return user, token


def user_for_token(token: str, *, session: Session) -> User | None:
    """The user a live (not revoked) token belongs to, or None. The lookup is by hash: the comparison
    is on a digest of fixed length, so its time says nothing about the token."""
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == token_hash(token),
                                                ApiToken.revoked_at.is_(None)))
    return session.get(User, row.user_id) if row is not None else None


def any_live_tokens(*, session: Session) -> bool:
    return session.scalar(select(ApiToken.id).where(ApiToken.revoked_at.is_(None)).limit(1)) is not None


def list_tokens(*, session: Session) -> Sequence[tuple[ApiToken, User]]:
    return session.execute(select(ApiToken, User).join(User, User.id == ApiToken.user_id)
                           .order_by(ApiToken.id)).all()


def revoke(name_or_id: str, *, session: Session) -> int:
    """Revoke every live token of user `name_or_id` (a name), or the one token with that id: returns how many."""
    q = select(ApiToken).where(ApiToken.revoked_at.is_(None))
    if name_or_id.isdigit():
        q = q.where(ApiToken.id == int(name_or_id))
    else:
        user = session.scalar(select(User).where(User.name == name_or_id))
        if user is None:
            raise UnknownUser(f"no user called {name_or_id!r}: `newslora tokens list` shows them")
        q = q.where(ApiToken.user_id == user.id)
    rows = session.scalars(q).all()
    for r in rows:
        r.revoked_at = utcnow()
    return len(rows)
