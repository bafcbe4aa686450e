"""Queries on what jobs produce: datasets, model artifacts, predictions, judge scores, evaluations.

Each takes the session as a keyword; the caller commits. Per-item writes are upserts on
(job, item) so that a re-delivered job never stores an item twice.
"""
from __future__ import annotations

from typing import Any, Sequence

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import Dataset, Evaluation, JudgeScore, ModelArtifact, Prediction

PREDICTION_FIELDS = ("label", "gold", "probs", "response", "follows_instruction", "latency_ms", "flags",
                     "error", "model", "adapter_id", "seq")
JUDGE_FIELDS = ("status", "coherence", "following", "reason", "judge_backend", "judge_model", "judge_digest",
                "latency_ms", "raw", "error", "extra")


def _upsert(session: Session, table, rows: list[dict[str, Any]], keys: tuple[str, ...], fields: tuple[str, ...]):
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    ins = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)
    stmt = ins.values(rows)
    stmt = stmt.on_conflict_do_update(index_elements=list(keys),
                                      set_={f: getattr(stmt.excluded, f) for f in fields})
    session.execute(stmt)


def save_predictions(job_id: int, rows: Sequence[dict[str, Any]], *, session: Session) -> None:
    clean = []
    for r in rows:
        row = {"job_id": job_id, "item_id": str(r["item_id"])}
        row.update({f: r.get(f) for f in PREDICTION_FIELDS})
        row["seq"] = row["seq"] or 0
        clean.append(row)
    for i in range(0, len(clean), 500):
        _upsert(session, Prediction.__table__, clean[i:i + 500], ("job_id", "item_id"), PREDICTION_FIELDS)


def done_item_ids(job_id: int, *, session: Session) -> set[str]:
    return set(session.scalars(select(Prediction.item_id).where(Prediction.job_id == job_id)).all())


def predictions(job_id: int, *, session: Session, offset: int = 0, limit: int = 100,
                failed: bool | None = None) -> tuple[Sequence[Prediction], int]:
    q = select(Prediction).where(Prediction.job_id == job_id)
    if failed is True:
        q = q.where(Prediction.error.is_not(None))
    elif failed is False:
        q = q.where(Prediction.error.is_(None))
    total = session.scalar(select(func.count()).select_from(q.subquery())) or 0
    rows = session.scalars(q.order_by(Prediction.seq, Prediction.id).offset(offset).limit(limit)).all()
    return rows, total


def all_predictions(job_id: int, *, session: Session) -> list[dict[str, Any]]:
    rows = session.scalars(select(Prediction).where(Prediction.job_id == job_id).order_by(Prediction.seq)).all()
    return [prediction_dict(p) for p in rows]


def prediction_dict(p: Prediction) -> dict[str, Any]:
    return {"item_id": p.item_id, **{f: getattr(p, f) for f in PREDICTION_FIELDS}}


def save_judge_scores(job_id: int, rows: Sequence[dict[str, Any]], *, session: Session) -> None:
    clean = [{"job_id": job_id, "item_id": str(r["item_id"]), **{f: r.get(f) for f in JUDGE_FIELDS}} for r in rows]
    _upsert(session, JudgeScore.__table__, clean, ("job_id", "item_id"), JUDGE_FIELDS)


def judge_scores(job_id: int, *, session: Session) -> list[dict[str, Any]]:
    rows = session.scalars(select(JudgeScore).where(JudgeScore.job_id == job_id).order_by(JudgeScore.id)).all()
    return [{"item_id": r.item_id, **{f: getattr(r, f) for f in JUDGE_FIELDS}} for r in rows]


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


def get_dataset(dataset_id: int, *, session: Session) -> Dataset | None:
    return session.get(Dataset, dataset_id)


def list_datasets(*, session: Session, limit: int = 50, offset: int = 0) -> Sequence[Dataset]:
    return session.scalars(select(Dataset).order_by(Dataset.id.desc()).limit(limit).offset(offset)).all()


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


def get_artifact(artifact_id: int, *, session: Session) -> ModelArtifact | None:
    return session.get(ModelArtifact, artifact_id)


def list_artifacts(*, session: Session, limit: int = 50, offset: int = 0) -> Sequence[ModelArtifact]:
    return session.scalars(select(ModelArtifact).order_by(ModelArtifact.id.desc()).limit(limit).offset(offset)).all()


def add_evaluation(*, session: Session, job_id: int | None, name: str, spec: dict[str, Any],
                   document: dict[str, Any], report_path: str | None) -> Evaluation:
    ev = Evaluation(job_id=job_id, name=name, spec=spec, document=document, report_path=report_path)
    session.add(ev)
    session.flush()
    return ev


def evaluation_by_job(job_id: int, *, session: Session) -> Evaluation | None:
    return session.scalar(select(Evaluation).where(Evaluation.job_id == job_id))


def get_evaluation(eval_id: int, *, session: Session) -> Evaluation | None:
    return session.get(Evaluation, eval_id)


def list_evaluations(*, session: Session, limit: int = 50, offset: int = 0) -> tuple[Sequence[Evaluation], int]:
    total = session.scalar(select(func.count()).select_from(Evaluation)) or 0
    rows = session.scalars(select(Evaluation).order_by(Evaluation.id.desc()).limit(limit).offset(offset)).all()
    return rows, total
