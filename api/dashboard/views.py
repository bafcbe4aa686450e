"""What the dashboard's pages show, read from the store: job trees, ETAs, training curves, filtered
predictions with their articles, and two evaluations side by side.

Plain functions over a session; the router renders what they return with autoescaping templates.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.dashboard.charts import COLOURS, Interval, Series, interval_chart, line_chart
from core.formatting import pct  # noqa: F401 - the templates' `pct` filter (router.py)
from core.specs.classify import ClassifySpec
from db import jobs as jobq
from db import results as resq
from db.models import JOB_STATUSES, TERMINAL, Evaluation, Job, utcnow
from workers.evaluation.metrics import compare_models
from workers.inference.items import load_items

MAX_TREE_DEPTH = 3  # pipeline -> step -> shard


# ---------------------------------------------------------------- jobs

@dataclass
class JobRow:
    job: Job
    depth: int = 0
    eta_s: float | None = None
    elapsed_s: float | None = None

    @property
    def terminal(self) -> bool:
        return self.job.status in TERMINAL


def eta_seconds(job: Job) -> float | None:
    """Seconds left: the worker's own estimate (train, classify) or elapsed time scaled by progress."""
    if job.status != "running":
        return None
    info = job.progress_info or {}
    if job.kind == "pipeline":  # its progress counts stages, which take very different times
        return None
    if isinstance(info.get("eta_s"), (int, float)):
        return float(info["eta_s"])
    if job.started_at is None or not job.progress or job.progress <= 0:
        return None
    elapsed = (utcnow() - job.started_at).total_seconds()
    return max(0.0, elapsed * (1 - job.progress) / job.progress)


def elapsed_seconds(job: Job) -> float | None:
    if job.started_at is None:
        return None
    return ((job.finished_at or utcnow()) - job.started_at).total_seconds()


def job_row(job: Job, depth: int = 0) -> JobRow:
    return JobRow(job, depth, eta_seconds(job), elapsed_seconds(job))


def job_rows(*, session: Session, kind: str | None, status: str | None, limit: int,
             offset: int, owner_id: int | None = None) -> tuple[list[JobRow], int]:
    """Without filters: top-level jobs, newest first, each followed by its children as a tree.
    With a kind or status filter: the matching jobs as a flat list. `owner_id`: that owner's jobs only."""
    if kind or status:
        rows, total = jobq.list_jobs(session=session, kind=kind, status=status, limit=limit, offset=offset,
                                     owner_id=owner_id)
        return [job_row(j) for j in rows], total
    top = select(Job).where(Job.parent_id.is_(None))
    if owner_id is not None:
        top = top.where(Job.owner_id == owner_id)
    total = session.scalar(select(func.count()).select_from(top.subquery())) or 0
    roots = session.scalars(top.order_by(Job.id.desc()).limit(limit).offset(offset)).all()
    kids: dict[int, list[Job]] = {}
    level = [j.id for j in roots]
    for _ in range(MAX_TREE_DEPTH):
        if not level:
            break
        found = session.scalars(select(Job).where(Job.parent_id.in_(level)).order_by(Job.id)).all()
        for c in found:
            kids.setdefault(c.parent_id, []).append(c)
        level = [c.id for c in found]
    out: list[JobRow] = []

    def walk(job: Job, depth: int) -> None:
        out.append(job_row(job, depth))
        for c in kids.get(job.id, []):
            walk(c, depth + 1)
    for r in roots:
        walk(r, 0)
    return out, total


def known_kinds(session: Session, owner_id: int | None = None) -> list[str]:
    q = select(Job.kind).distinct()
    if owner_id is not None:
        q = q.where(Job.owner_id == owner_id)
    return sorted(session.scalars(q).all())


STATUSES = JOB_STATUSES


def training_curves(job: Job, *, session: Session) -> list[Any]:
    """Loss and validation-accuracy charts from a train job's events (the worker logs loss with its
    progress and val_loss / val_accuracy at each evaluation)."""
    if job.kind != "train":
        return []
    loss, val_loss, val_acc = [], [], []
    after = 0
    while True:
        batch = jobq.events(job.id, session=session, after_id=after, limit=1000)
        for e in batch:
            m = e.metrics or {}
            step = m.get("step", m.get("done"))
            if not isinstance(step, (int, float)):
                continue
            if isinstance(m.get("loss"), (int, float)):
                loss.append((float(step), float(m["loss"])))
            if isinstance(m.get("val_loss"), (int, float)):
                val_loss.append((float(step), float(m["val_loss"])))
            if isinstance(m.get("val_accuracy"), (int, float)):
                val_acc.append((float(step), float(m["val_accuracy"])))
        if len(batch) < 1000:
            break
        after = batch[-1].id
    charts = [line_chart([Series("training loss", loss, COLOURS[0]),
                          Series("validation loss", val_loss, COLOURS[1], markers=True)],
                         x_label="step", y_label="loss", title="training and validation loss"),
              line_chart([Series("validation accuracy", val_acc, COLOURS[2], markers=True)],
                         x_label="step", y_label="accuracy", title="validation accuracy", y_range=(0.0, 1.0))]
    return [c for c in charts if c is not None]


def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=False, default=str)


# ---------------------------------------------------------------- predictions

@dataclass
class PredictionFilter:
    wrong: bool = False
    gold: str | None = None
    predicted: str | None = None
    min_conf: float | None = None
    max_conf: float | None = None

    def keep(self, p: dict[str, Any], conf: float | None) -> bool:
        if self.wrong and (p.get("gold") is None or p.get("label") == p.get("gold")):
            return False
        if self.gold and p.get("gold") != self.gold:
            return False
        if self.predicted and p.get("label") != self.predicted:
            return False
        if self.min_conf is not None and (conf is None or conf < self.min_conf):
            return False
        if self.max_conf is not None and (conf is None or conf > self.max_conf):
            return False
        return True


def confidence(p: dict[str, Any]) -> float | None:
    """The probability the model gave its own answer (None without scores)."""
    probs = p.get("probs") or {}
    vals = {k: v for k, v in probs.items() if isinstance(v, (int, float))}
    if not vals:
        return None
    lab = p.get("label")
    return float(vals[lab]) if lab in vals else float(max(vals.values()))


@lru_cache(maxsize=8)
def _file_texts(job_id: int, spec_json: str, dataset_path: str | None) -> dict[str, str]:
    spec = ClassifySpec.model_validate_json(spec_json)
    items, _rejected = load_items(spec, Path(dataset_path) if dataset_path else None)
    return {str(it["id"]): it["text"] for it in items}


def article_texts(job: Job, *, session: Session) -> tuple[dict[str, str], str | None]:
    """Item id -> text for a classify job (inline items, its input file or its dataset split), and why
    the texts are missing when they cannot be read."""
    spec = job.spec or {}
    if spec.get("items") is not None:
        return {str(it.get("id")): str(it.get("text", "")) for it in spec["items"]}, None
    dataset_path = None
    if spec.get("dataset_id"):
        ds = resq.get_dataset(int(spec["dataset_id"]), session=session)
        if ds is None:
            return {}, f"dataset {spec['dataset_id']} is gone"
        dataset_path = ds.path
    try:
        return _file_texts(job.id, json.dumps(spec, sort_keys=True), dataset_path), None
    except (OSError, ValueError) as e:  # InputFileError is a ValueError
        return {}, f"the articles cannot be read: {e}"


@dataclass
class PredictionView:
    rows: list[dict[str, Any]]
    total: int  # all predictions of the job
    matched: int  # after the filter
    labels: list[str]
    golds: list[str]
    texts_missing: str | None = None


def prediction_page(job: Job, flt: PredictionFilter, *, session: Session, offset: int,
                    limit: int) -> PredictionView:
    preds = resq.all_predictions(job.id, session=session)
    texts, why = article_texts(job, session=session)
    labels = list((job.result or {}).get("label_names") or job.spec.get("label_names") or [])
    for p in preds:
        for lab in (p.get("probs") or {}):
            if lab not in labels:
                labels.append(lab)
    golds = sorted({str(p["gold"]) for p in preds if p.get("gold") is not None})
    kept = []
    for p in preds:
        conf = confidence(p)
        if flt.keep(p, conf):
            kept.append({**p, "confidence": conf, "text": texts.get(str(p["item_id"])),
                         "correct": None if p.get("gold") is None else p.get("label") == p.get("gold"),
                         "probs_sorted": sorted(((k, float(v)) for k, v in (p.get("probs") or {}).items()
                                                 if isinstance(v, (int, float))), key=lambda kv: -kv[1])})
    return PredictionView(kept[offset:offset + limit], len(preds), len(kept), labels, golds, why)


# ---------------------------------------------------------------- evaluations

def model_names(ev: Evaluation) -> list[str]:
    return list((ev.document or {}).get("models") or {})


def default_model(ev: Evaluation) -> str | None:
    """The model an evaluation stands for: the last one (the fine-tuned run; the base comes first)."""
    names = model_names(ev)
    return names[-1] if names else None


def classify_job_of(ev: Evaluation, model: str) -> int | None:
    """The classify job whose predictions gave `model`'s figures: evaluate_runs keeps the order of the
    spec's classify_job_ids."""
    doc = ev.document or {}
    ids = (doc.get("models_used") or {}).get("classify_job_ids") or (ev.spec or {}).get("classify_job_ids") or []
    names = model_names(ev)
    if model not in names or len(ids) != len(names):
        return None
    return int(ids[names.index(model)])


@dataclass
class Side:
    ev: Evaluation
    model: str
    metrics: dict[str, Any]
    colour: str

    @property
    def title(self) -> str:
        return f"#{self.ev.id} {self.ev.name} · {self.model}"


@dataclass
class Comparison:
    a: Side
    b: Side
    classes: list[str]
    ci_chart: Any
    paired: dict[str, Any] | None = None
    paired_missing: str | None = None
    label_names: list[str] = field(default_factory=list)


def side(ev: Evaluation, model: str | None, colour: str) -> Side:
    """Raises LookupError when the evaluation holds no such model."""
    names = model_names(ev)
    model = model if model in names else default_model(ev)
    if model is None:
        raise LookupError(f"evaluation {ev.id} holds no models")
    return Side(ev, model, ev.document["models"][model], colour)


def compare(a: Side, b: Side, *, session: Session) -> Comparison:
    classes = list(a.metrics.get("per_class") or {})
    classes += [c for c in (b.metrics.get("per_class") or {}) if c not in classes]
    rows = []
    for key, what in (("accuracy", "accuracy"), ("macro_f1", "macro-F1")):
        for s in (a, b):
            m = s.metrics.get(key) or {}
            if m.get("value") is not None:
                rows.append(Interval(f"{what}: #{s.ev.id} {s.model}", m["value"], m.get("ci"), s.colour))
    cmp = Comparison(a, b, classes, interval_chart(rows, title="accuracy and macro-F1 with 95% intervals"))
    cmp.label_names = list((a.ev.document or {}).get("label_names") or [])
    ja, jb = classify_job_of(a.ev, a.model), classify_job_of(b.ev, b.model)
    if ja is None or jb is None:
        cmp.paired_missing = "the evaluations do not name the classify jobs behind these models"
        return cmp
    pa, pb = resq.all_predictions(ja, session=session), resq.all_predictions(jb, session=session)
    if not pa or not pb:
        cmp.paired_missing = f"no stored predictions for classify job {ja if not pa else jb}"
        return cmp
    try:
        cmp.paired = compare_models(pa, pb, label_names=cmp.label_names or None, bootstrap=1000)
        cmp.paired["jobs"] = (ja, jb)
    except ValueError as e:  # no shared item, or the same item with two gold labels
        cmp.paired_missing = str(e)
    return cmp


def confusion_cells(metrics: dict[str, Any]) -> dict[str, Any]:
    """The confusion matrix with each cell's share of its gold row (for shading)."""
    conf = metrics.get("confusion") or {}
    rows = []
    for lab, counts in zip(conf.get("rows") or [], conf.get("counts") or []):
        n = sum(counts) or 1
        rows.append((lab, [(c, c / n) for c in counts]))
    return {"cols": conf.get("cols") or [], "rows": rows}


def evaluation_summary(ev: Evaluation) -> list[dict[str, Any]]:
    """One line per model: accuracy and macro-F1 with intervals, items."""
    out = []
    for name, m in ((ev.document or {}).get("models") or {}).items():
        out.append({"model": name, "n": m.get("n"), "accuracy": m.get("accuracy") or {},
                    "macro_f1": m.get("macro_f1") or {}})
    return out


def report_html(ev: Evaluation) -> str:
    """The evaluation's HTML report: the file its job wrote, or one rendered again from the stored
    document when that file is gone (or was never written)."""

    from workers.evaluation.report import write_report  # lazy: matplotlib, only when a report must be drawn again
    if ev.report_path:
        path = Path(ev.report_path)
        if path.is_file():
            return path.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix="newslora-report-") as tmp:
        doc = ev.document or {}
        return write_report(doc, Path(tmp), loss_history=doc.get("loss_history")).read_text(encoding="utf-8")
