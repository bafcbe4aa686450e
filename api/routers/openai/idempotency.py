"""`Idempotency-Key` on the `/v1` routes that create something (files, batches, fine-tuning jobs).

A retry with the same key and the same request answers the object the first request created (nothing new
is made); the same key on a different request is a 422 naming the object it made (the IETF draft
"The Idempotency-Key HTTP Header Field": 422 for a key reused with another payload). Keys are per caller and
per route, kept in the store (db/idempotency.py). The key's row is written in the same transaction as the
object, so of two concurrent requests with one key, one creates and the other answers its object.

Not 409 for a reused key: the SDK retries a 409, and a retry cannot help there.
"""
from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any

from fastapi import Header
from sqlalchemy.orm import Session

from api.deps import Caller
from api.routers.openai.errors import OpenAIError
from db import idempotency as keyq

IdempotencyKeyHeader = Annotated[str | None, Header(
    alias="Idempotency-Key", min_length=1, max_length=200,
    description="A retry with the same key and request answers the object the first one created; the same "
                "key with a different request answers 422.")]


def fingerprint(*parts: Any) -> str:
    """sha256 of a request's parts as canonical JSON (bytes as their sha256)."""
    canon = [hashlib.sha256(p).hexdigest() if isinstance(p, bytes) else p for p in parts]
    return hashlib.sha256(json.dumps(canon, sort_keys=True, default=str).encode()).hexdigest()


def replayed(key: str | None, scope: str, fp: str, caller: Caller, session: Session) -> str | None:
    """The id of the object the first request with `key` created (None: a new key, or no key).

    Raises:
        OpenAIError: 422 when the key was used for a different request.
    """
    if not key:
        return None
    row = keyq.find_key(session=session, owner_id=caller.user_id, scope=scope, key=key)
    if row is None:
        return None
    if row.fingerprint != fp:
        raise OpenAIError(422, f"Idempotency-Key {key!r} was already used with a different request (it created "
                               f"{row.object_id}); send a new key for a new request",
                          param="Idempotency-Key", code="idempotency_key_reused")
    return row.object_id


def remember(key: str | None, scope: str, fp: str, object_id: str, caller: Caller, session: Session) -> None:
    """Record that `key` created `object_id` (flushed with the object; the caller commits both)."""
    if key:
        keyq.add_key(session=session, owner_id=caller.user_id, scope=scope, key=key, fingerprint=fp,
                     object_id=object_id)
