"""OpenAI fine-tuning jobs (`/v1/fine_tuning/jobs`): rows here, each a view of one pipeline job (prep -> train)
(db/models.py `FineTuningJob`). Each query takes the session as a keyword; the caller commits.
"""
from __future__ import annotations

from typing import Any, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.ids import new_id
from db.models import FineTuningJob

FT_JOB_ID_PREFIX = "ftjob-"


def new_fine_tuning_job_id() -> str:
    return new_id(FT_JOB_ID_PREFIX)


def add_fine_tuning_job(*, session: Session, **fields: Any) -> FineTuningJob:
    ft = FineTuningJob(id=new_fine_tuning_job_id(), **fields)
    session.add(ft)
    session.flush()
    return ft


def get_fine_tuning_job(ft_id: str, *, session: Session, owner_id: int | None = None) -> FineTuningJob | None:
    """The fine-tuning job, or None when missing or (with owner_id) owned by someone else."""
    ft = session.get(FineTuningJob, ft_id)
    if ft is None or (owner_id is not None and ft.owner_id != owner_id):
        return None
    return ft


def fine_tuning_job_of_pipeline(job_id: int, *, session: Session) -> FineTuningJob | None:
    return session.scalar(select(FineTuningJob).where(FineTuningJob.job_id == job_id))


def list_fine_tuning_jobs(*, session: Session, owner_id: int | None = None, after: str | None = None,
                          limit: int = 20, metadata: dict[str, str] | None = None
                          ) -> tuple[Sequence[FineTuningJob], bool]:
    """A page of fine-tuning jobs, newest first, after the cursor `after` (a job id): (jobs, has_more).

    `metadata` keeps the jobs whose metadata holds every given key with the given value (compared here, not
    in SQL: JSON queries differ between SQLite and PostgreSQL, and one caller's jobs are few).
    """
    q = select(FineTuningJob)
    if owner_id is not None:
        q = q.where(FineTuningJob.owner_id == owner_id)
    if after:
        cursor = session.get(FineTuningJob, after)
        if cursor is not None:
            q = q.where((FineTuningJob.created_at < cursor.created_at) |
                        ((FineTuningJob.created_at == cursor.created_at) & (FineTuningJob.id < cursor.id)))
    q = q.order_by(FineTuningJob.created_at.desc(), FineTuningJob.id.desc())
    if not metadata:
        rows = session.scalars(q.limit(limit + 1)).all()
        return rows[:limit], len(rows) > limit
    kept: list[FineTuningJob] = []
    for ft in session.scalars(q):
        tags = ft.job_metadata or {}
        if all(tags.get(k) == v for k, v in metadata.items()):
            kept.append(ft)
            if len(kept) > limit:
                break
    return kept[:limit], len(kept) > limit
