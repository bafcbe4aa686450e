"""Idempotency keys of `/v1` requests (db/models.py `IdempotencyKey`): per owner and route, the object the
first request with a key created and a fingerprint of that request.

Each query takes the session as a keyword; the caller commits. The key's row is added in the same
transaction as the object it names, so a concurrent request with the same key fails on the unique
constraint and then finds the winner's row.
"""
from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from db.models import IdempotencyKey


def find_key(*, session: Session, owner_id: int, scope: str, key: str) -> IdempotencyKey | None:
    return session.scalar(select(IdempotencyKey).where(IdempotencyKey.owner_id == owner_id,
                                                       IdempotencyKey.scope == scope, IdempotencyKey.key == key))


def add_key(*, session: Session, owner_id: int, scope: str, key: str, fingerprint: str,
            object_id: str) -> IdempotencyKey:
    row = IdempotencyKey(owner_id=owner_id, scope=scope, key=key, fingerprint=fingerprint, object_id=object_id)
    session.add(row)
    session.flush()
    return row


def forget_object(*, session: Session, scope: str, object_id: str) -> None:
    """Drop the keys naming an object that is being taken back (its creation failed after the key was added)."""
    session.execute(delete(IdempotencyKey).where(IdempotencyKey.scope == scope,
                                                 IdempotencyKey.object_id == object_id))
