"""Stored files (uploads and job outputs): rows here, bytes under the home's `files/` folder.

Each query takes the session as a keyword; the caller commits.
"""
from __future__ import annotations

from typing import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.ids import is_id, new_id
from db.idempotency import forget_object
from db.models import StoredFile

FILE_ID_PREFIX = "file-"


def new_file_id() -> str:
    return new_id(FILE_ID_PREFIX)


def is_file_id(value: str) -> bool:
    return is_id(value, FILE_ID_PREFIX)


def add_file(*, session: Session, file_id: str, owner_id: int | None, filename: str, purpose: str, size: int,
             sha256: str, path: str, job_id: int | None = None) -> StoredFile:
    f = StoredFile(id=file_id, owner_id=owner_id, filename=filename, purpose=purpose, bytes=size, sha256=sha256,
                   path=path, status="processed", job_id=job_id)
    session.add(f)
    session.flush()
    return f


def get_file(file_id: str, *, session: Session, owner_id: int | None = None) -> StoredFile | None:
    """The file, or None when missing or (with owner_id) owned by someone else."""
    f = session.get(StoredFile, file_id)
    if f is None or (owner_id is not None and f.owner_id != owner_id):
        return None
    return f


def list_files(*, session: Session, owner_id: int | None = None, purpose: str | None = None,
               after: str | None = None, limit: int = 20, order: str = "desc") -> tuple[Sequence[StoredFile], bool]:
    """A page of files (newest first by default) after the cursor `after` (a file id): (files, has_more)."""
    q = select(StoredFile)
    if owner_id is not None:
        q = q.where(StoredFile.owner_id == owner_id)
    if purpose:
        q = q.where(StoredFile.purpose == purpose)
    key = (StoredFile.created_at, StoredFile.id)
    if after:
        cursor = session.get(StoredFile, after)
        if cursor is not None:
            if order == "asc":
                q = q.where((StoredFile.created_at > cursor.created_at) |
                            ((StoredFile.created_at == cursor.created_at) & (StoredFile.id > cursor.id)))
            else:
                q = q.where((StoredFile.created_at < cursor.created_at) |
                            ((StoredFile.created_at == cursor.created_at) & (StoredFile.id < cursor.id)))
    q = q.order_by(*(k.asc() if order == "asc" else k.desc() for k in key)).limit(limit + 1)
    rows = session.scalars(q).all()
    return rows[:limit], len(rows) > limit


def delete_file(f: StoredFile, *, session: Session) -> None:
    """Delete the row, and any idempotency key naming it (that key may make a new file now)."""
    forget_object(session=session, scope="files", object_id=f.id)
    session.delete(f)
