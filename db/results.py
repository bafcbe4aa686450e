"""Queries on what jobs produce: datasets, model artifacts, predictions, judge scores, evaluations.

Each takes the session as a keyword; the caller commits. Per-item writes are upserts on
(job, item) so that a re-delivered job never stores an item twice.
"""
from __future__ import annotations

from typing import Any, Sequence

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from core.contracts.judge import JudgeRow
from core.contracts.prediction import PredictionRow
from db.models import Dataset, Evaluation, Job, JudgeScore, ModelArtifact, Prediction

PREDICTION_FIELDS = tuple(c for c in PredictionRow.COLUMNS if c != "item_id")
JUDGE_FIELDS = tuple(c for c in JudgeRow.COLUMNS if c != "item_id") + (JudgeRow.EXTRA_COLUMN,)


def _upsert(session: Session, table, rows: list[dict[str, Any]], keys: tuple[str, ...], fields: tuple[str, ...]):
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    ins = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)
    stmt = ins.values(rows)
    stmt = stmt.on_conflict_do_update(index_elements=list(keys),
                                      set_={f: getattr(stmt.excluded, f) for f in fields})
    session.execute(stmt)


def save_predictions(job_id: int, rows: Sequence[PredictionRow], *, session: Session) -> None:
    """Upsert prediction rows on (job, item): a retried write stores each item once."""
    clean = [{"job_id": job_id, **PredictionRow.model_validate(r).to_columns()} for r in rows]
    for i in range(0, len(clean), 500):
        _upsert(session, Prediction.__table__, clean[i:i + 500], ("job_id", "item_id"), PREDICTION_FIELDS)


def done_item_ids(job_id: int, *, session: Session) -> set[str]:
    return set(session.scalars(select(Prediction.item_id).where(Prediction.job_id == job_id)).all())


def prediction_job_ids(job_id: int, *, session: Session) -> list[int]:
    """The job ids whose predictions are a job's: its own and, for a sharded classify job, its shards'
    (workers/jobs/shards.py: shard children store their rows under their own ids)."""
    if session.scalar(select(Job.kind).where(Job.id == job_id)) != "classify":
        return [job_id]
    return [job_id, *session.scalars(select(Job.id).where(Job.parent_id == job_id, Job.kind == "classify"))]


def predictions(job_id: int, *, session: Session, offset: int = 0, limit: int = 100,
                failed: bool | None = None) -> tuple[Sequence[Prediction], int]:
    """A page of a job's predictions (a sharded job's: all its shards'), in input order."""
    q = select(Prediction).where(Prediction.job_id.in_(prediction_job_ids(job_id, session=session)))
    if failed is True:
        q = q.where(Prediction.error.is_not(None))
    elif failed is False:
        q = q.where(Prediction.error.is_(None))
    total = session.scalar(select(func.count()).select_from(q.subquery())) or 0
    rows = session.scalars(q.order_by(Prediction.seq, Prediction.id).offset(offset).limit(limit)).all()
    return rows, total


def prediction_rows(job_id: int, *, session: Session, shards: bool = True) -> list[PredictionRow]:
    """Every stored prediction of a job as its contract, in input order (with `shards`, a sharded job's
    shards' rows too)."""
    ids = prediction_job_ids(job_id, session=session) if shards else [job_id]
    rows = session.scalars(select(Prediction).where(Prediction.job_id.in_(ids)).order_by(Prediction.seq)).all()
    return [prediction_row(p) for p in rows]


def all_predictions(job_id: int, *, session: Session) -> list[dict[str, Any]]:
    """`prediction_rows` as plain dicts (JSON-ready)."""
    return [r.model_dump(mode="json", exclude={"format_version"}) for r in prediction_rows(job_id, session=session)]


def prediction_row(p: Prediction) -> PredictionRow:
    return PredictionRow.from_columns({c: getattr(p, c) for c in PredictionRow.COLUMNS})


def save_judge_scores(job_id: int, rows: Sequence[JudgeRow], *, session: Session) -> None:
    """Upsert judge rows on (job, item); every field of the row survives (columns + the `extra` JSON)."""
    clean = [{"job_id": job_id, **JudgeRow.model_validate(r).to_columns()} for r in rows]
    _upsert(session, JudgeScore.__table__, clean, ("job_id", "item_id"), JUDGE_FIELDS)


def judge_rows(job_id: int, *, session: Session) -> list[JudgeRow]:
    rows = session.scalars(select(JudgeScore).where(JudgeScore.job_id == job_id).order_by(JudgeScore.id)).all()
    return [JudgeRow.from_columns({c: getattr(r, c) for c in JUDGE_FIELDS + ("item_id",)}) for r in rows]


def judge_scores(job_id: int, *, session: Session) -> list[dict[str, Any]]:
    """`judge_rows` as plain dicts (JSON-ready)."""
    return [r.model_dump(mode="json", exclude={"format_version"}) for r in judge_rows(job_id, session=session)]


def add_dataset(*, session: Session, job_id: int | None, name: str, path: str, hash: str, spec_hash: str,
                spec: dict[str, Any], meta: dict[str, Any]) -> Dataset:
    ds = Dataset(job_id=job_id, name=name, path=path, hash=hash, spec_hash=spec_hash, spec=spec, meta=meta)
    session.add(ds)
    session.flush()
    return ds


def dataset_by_job(job_id: int, *, session: Session) -> Dataset | None:
    return session.scalar(select(Dataset).where(Dataset.job_id == job_id))


def dataset_by_spec_hash(spec_hash: str, *, session: Session) -> Dataset | None:
    return session.scalar(select(Dataset).where(Dataset.spec_hash == spec_hash).order_by(Dataset.id.desc()))


def owned_by(q, table, owner_id: int | None):
    """`q` narrowed to rows whose producing job (`table.job_id`) belongs to `owner_id` (None: no narrowing).
    A row no job produced (registered by hand) belongs to nobody: only an admin sees it."""
    if owner_id is None:
        return q
    return q.where(table.job_id.in_(select(Job.id).where(Job.owner_id == owner_id)))


def owner_of_job(job_id: int | None, *, session: Session) -> int | None:
    return None if job_id is None else session.scalar(select(Job.owner_id).where(Job.id == job_id))


def get_dataset(dataset_id: int, *, session: Session, owner_id: int | None = None) -> Dataset | None:
    """The dataset, or None when missing or (with `owner_id`) made by someone else's job."""
    return session.scalar(owned_by(select(Dataset).where(Dataset.id == dataset_id), Dataset, owner_id))


def list_datasets(*, session: Session, limit: int = 50, offset: int = 0,
                  owner_id: int | None = None) -> Sequence[Dataset]:
    q = owned_by(select(Dataset), Dataset, owner_id)
    return session.scalars(q.order_by(Dataset.id.desc()).limit(limit).offset(offset)).all()


def add_model_artifact(*, session: Session, **fields: Any) -> ModelArtifact:
    art = ModelArtifact(**fields)
    session.add(art)
    session.flush()
    return art


def artifact_by_job(job_id: int, *, session: Session) -> ModelArtifact | None:
    return session.scalar(select(ModelArtifact).where(ModelArtifact.job_id == job_id))


def artifact_by_spec_hash(spec_hash: str, *, session: Session) -> ModelArtifact | None:
    return session.scalar(select(ModelArtifact).where(ModelArtifact.spec_hash == spec_hash)
                          .order_by(ModelArtifact.id.desc()))


def get_artifact(artifact_id: int, *, session: Session, owner_id: int | None = None) -> ModelArtifact | None:
    """The artifact, or None when missing or (with `owner_id`) made by someone else's job."""
    return session.scalar(owned_by(select(ModelArtifact).where(ModelArtifact.id == artifact_id), ModelArtifact,
                                   owner_id))


def exports_of(adapter_id: int, *, session: Session, owner_id: int | None = None) -> Sequence[ModelArtifact]:
    """The export artifacts made from an adapter (kind 'export', `source_adapter_id` the adapter's), newest first."""
    q = owned_by(select(ModelArtifact).where(ModelArtifact.kind == "export",
                                             ModelArtifact.source_adapter_id == adapter_id), ModelArtifact, owner_id)
    return session.scalars(q.order_by(ModelArtifact.id.desc())).all()


def list_artifacts(*, session: Session, limit: int = 50, offset: int = 0,
                   owner_id: int | None = None) -> Sequence[ModelArtifact]:
    q = owned_by(select(ModelArtifact), ModelArtifact, owner_id)
    return session.scalars(q.order_by(ModelArtifact.id.desc()).limit(limit).offset(offset)).all()


def add_evaluation(*, session: Session, job_id: int | None, name: str, spec: dict[str, Any],
                   document: dict[str, Any], report_path: str | None) -> Evaluation:
    ev = Evaluation(job_id=job_id, name=name, spec=spec, document=document, report_path=report_path)
    session.add(ev)
    session.flush()
    return ev


def evaluation_by_job(job_id: int, *, session: Session) -> Evaluation | None:
    return session.scalar(select(Evaluation).where(Evaluation.job_id == job_id))


def get_evaluation(eval_id: int, *, session: Session, owner_id: int | None = None) -> Evaluation | None:
    """The evaluation, or None when missing or (with `owner_id`) made by someone else's job."""
    return session.scalar(owned_by(select(Evaluation).where(Evaluation.id == eval_id), Evaluation, owner_id))


def list_evaluations(*, session: Session, limit: int = 50, offset: int = 0,
                     owner_id: int | None = None) -> tuple[Sequence[Evaluation], int]:
    q = owned_by(select(Evaluation), Evaluation, owner_id)
    total = session.scalar(select(func.count()).select_from(q.subquery())) or 0
    rows = session.scalars(q.order_by(Evaluation.id.desc()).limit(limit).offset(offset)).all()
    return rows, total
