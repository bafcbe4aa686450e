"""OpenAI batches (`/v1/batches`): rows here, each a view of one classify job (db/models.py `Batch`).

Each query takes the session as a keyword; the caller commits.
"""
from __future__ import annotations

from typing import Any, Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.ids import new_id
from db.models import Batch, Prediction
from db.results import prediction_job_ids

BATCH_ID_PREFIX = "batch_"


def new_batch_id() -> str:
    return new_id(BATCH_ID_PREFIX)


def add_batch(*, session: Session, **fields: Any) -> Batch:
    b = Batch(id=new_batch_id(), **fields)
    session.add(b)
    session.flush()
    return b


def get_batch(batch_id: str, *, session: Session, owner_id: int | None = None, for_update: bool = False) -> Batch | None:
    """The batch, or None when missing or (with owner_id) owned by someone else. `for_update` locks its row
    (PostgreSQL) so that one request alone finalizes it."""
    q = select(Batch).where(Batch.id == batch_id)
    if for_update:
        q = q.with_for_update()
    b = session.scalar(q)
    if b is None or (owner_id is not None and b.owner_id != owner_id):
        return None
    return b


def list_batches(*, session: Session, owner_id: int | None = None, after: str | None = None,
                 limit: int = 20) -> tuple[Sequence[Batch], bool]:
    """A page of batches, newest first, after the cursor `after` (a batch id): (batches, has_more)."""
    q = select(Batch)
    if owner_id is not None:
        q = q.where(Batch.owner_id == owner_id)
    if after:
        cursor = session.get(Batch, after)
        if cursor is not None:
            q = q.where((Batch.created_at < cursor.created_at) |
                        ((Batch.created_at == cursor.created_at) & (Batch.id < cursor.id)))
    rows = session.scalars(q.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit + 1)).all()
    return rows[:limit], len(rows) > limit


def prediction_counts(job_id: int, *, session: Session) -> tuple[int, int]:
    """(answered, failed) predictions stored so far for a classify job (a sharded one's shards included)."""
    ids = prediction_job_ids(job_id, session=session)
    ok, bad = session.execute(
        select(func.count(Prediction.id) - func.count(Prediction.error),
               func.count(Prediction.error)).where(Prediction.job_id.in_(ids))).one()
    return int(ok or 0), int(bad or 0)
