"""Every contract round-trips through its one reader and writer, and the store drops no field of a row
(on SQLite and PostgreSQL)."""
from __future__ import annotations

import json

import pytest

from core.contracts.adapter import AdapterMeta
from core.contracts.base import ContractError
from core.contracts.evaluation import EvaluationDoc
from core.contracts.judge import JudgeRow
from core.contracts.metrics import MetricsRow, append_metrics, read_metrics, truncate_metrics_after
from core.contracts.prediction import PredictionRow
from db import jobs as jobq
from db import results as resq
from db.models import JudgeScore, Prediction
from db.session import session_scope
from tests.conftest import make_dataset_meta


def _left_empty(row, table) -> list[str]:
    """What `row` would leave empty in `table`: the table's columns (from the SQLAlchemy metadata, less the
    keys the store sets) that its column mapping leaves None or empty, and the contract's fields left at
    their defaults (those travel in the table's JSON column, where a None would hide a dropped field)."""
    cols = row.to_columns()
    stored = [c.name for c in table.columns if c.name not in ("id", "job_id")]
    empty = [name for name in stored if cols.get(name) in (None, [], {})]
    return empty + [name for name, field in type(row).model_fields.items()
                    if name not in stored and name != "format_version" and getattr(row, name) == field.default]


PREDICTION = PredictionRow(item_id="item-7", seq=3, label="Sports", gold="World",
                           probs={"World": 0.25, "Sports": 0.75}, response="Sports.", follows_instruction=True,
                           latency_ms=12.5, flags=["truncated"], error="late", model="smollm2-135m", adapter_id=4)
JUDGE = JudgeRow(item_id="item-7", status="scored", coherence=80.0, following=65.0, reason="clear",
                 judge_backend="ollama", judge_model="deepseek-r1:8b", judge_digest="sha256:abc", latency_ms=950.0,
                 raw='{"score": 80}', error="retried once", score=72.5, error_kind="timeout", rubric="raschka",
                 rubric_version="raschka-1", rubric_sha="0f0f", scoring="probability", spread={"score": 4.5},
                 score_mass=0.93, attempts=2, thinking_chars=1200, parse="json", control="gold", pair_id="pair-7",
                 repeat=1)


def test_fixture_rows_set_every_field():
    """The rows the store tests round-trip fill every column of their tables and every field of their
    contracts, so a column or field the store drops is seen. The columns come from the tables, not from
    the fixtures: a column added to a table fails here until the fixture sets it."""
    for table, contract in ((Prediction.__table__, PredictionRow), (JudgeScore.__table__, JudgeRow)):
        mapped = set(contract.COLUMNS) | ({contract.EXTRA_COLUMN} if contract.EXTRA_COLUMN else set())
        assert {c.name for c in table.columns} - {"id", "job_id"} == mapped, \
            f"{table.name}'s columns and {contract.__name__}'s column mapping differ"
    assert "label" in _left_empty(PredictionRow(item_id="x"), Prediction.__table__)  # the check sees a gap
    assert "control" in _left_empty(JudgeRow(item_id="x", error="e"), JudgeScore.__table__)
    assert _left_empty(PREDICTION, Prediction.__table__) == [], "set them in PREDICTION"
    assert _left_empty(JUDGE, JudgeScore.__table__) == [], "set them in JUDGE"


def _job(url) -> int:
    with session_scope(url) as s:
        return jobq.create_job(session=s, kind="noop", queue="cpu", spec={}).id


def test_prediction_and_judge_rows_keep_every_field_in_the_store(store_url):
    test_fixture_rows_set_every_field()
    job_id = _job(store_url)
    with session_scope(store_url) as s:
        resq.save_predictions(job_id, [PREDICTION], session=s)
        resq.save_judge_scores(job_id, [JUDGE], session=s)
    with session_scope(store_url) as s:
        [pred] = resq.prediction_rows(job_id, session=s)
        [judged] = resq.judge_rows(job_id, session=s)
        assert resq.judge_scores(job_id, session=s)[0]["judge_digest"] == "sha256:abc"
    assert pred == PREDICTION
    assert judged == JUDGE  # backend, digest, error kind, rubric, attempts ... all survive
    with session_scope(store_url) as s:  # an upsert of the same item replaces it, never duplicates it
        resq.save_judge_scores(job_id, [JUDGE.model_copy(update={"status": "unscored", "coherence": None})],
                               session=s)
    with session_scope(store_url) as s:
        assert [(r.status, r.error_kind) for r in resq.judge_rows(job_id, session=s)] == [("unscored", "timeout")]


def test_a_row_with_an_unknown_field_is_refused_before_the_store():
    with pytest.raises(Exception, match="backend"):
        JudgeRow.model_validate({"item_id": "a", "backend": "ollama"})  # the old key, which the store dropped
    with pytest.raises(Exception, match="extra"):
        PredictionRow.model_validate({"item_id": "a", "confidence": 0.9})


def test_evaluation_document_round_trips_through_the_store(store_url):
    doc = EvaluationDoc(name="e", label_names=["A", "B"], base="base", models={"base": {"accuracy": 0.5}},
                        missing=["no judge"], models_used={"adapter_ids": [1]}, judge_validity={"prefers_gold": 0.9})
    job_id = _job(store_url)
    with session_scope(store_url) as s:
        ev_id = resq.add_evaluation(session=s, job_id=job_id, name="e", spec={}, document=doc.model_dump(mode="json"),
                                    report_path=None).id
    with session_scope(store_url) as s:
        stored = resq.get_evaluation(ev_id, session=s).document
    assert EvaluationDoc.validated(stored, where="test") == doc


def test_artifact_files_round_trip_and_refuse_what_they_do_not_know(tmp_path):
    meta = make_dataset_meta(label_names=["A", "B"], instruction="Classify.", hash="h1")
    meta.save(tmp_path)
    assert type(meta).load(tmp_path) == meta
    adapter = AdapterMeta(template="alpaca", instruction="Classify.", label_names=["A", "B"], base_model="m",
                          base_model_digest="d", steps=3, max_seq_len=64, spec={}, code_version="c", backend="peft")
    adapter.save(tmp_path)
    assert AdapterMeta.load(tmp_path) == adapter
    raw = json.loads((tmp_path / "newslora.json").read_text())
    (tmp_path / "newslora.json").write_text(json.dumps({**raw, "format_version": 99}))
    with pytest.raises(ContractError, match="format_version 99"):
        AdapterMeta.load(tmp_path)
    (tmp_path / "newslora.json").write_text(json.dumps({**raw, "templat": "x"}))
    with pytest.raises(ContractError, match="templat"):
        AdapterMeta.load(tmp_path)
    with pytest.raises(ContractError, match="has no meta.json"):
        type(meta).load(tmp_path / "nowhere")


def test_metrics_rows_append_read_and_truncate(tmp_path):
    rows = [MetricsRow(step=1, loss=2.0, lr=1e-4, tokens=10, tokens_per_s=5.0, step_s=2.0, train_s=2.0),
            MetricsRow(type="eval", step=1, val_loss=1.5, val_accuracy=0.5, val_items=8, eval_s=1.0, train_s=2.0),
            MetricsRow(step=2, loss=1.0, train_s=4.0)]
    append_metrics(tmp_path, rows)
    assert read_metrics(tmp_path) == rows
    truncate_metrics_after(tmp_path, 1)
    assert read_metrics(tmp_path) == rows[:2]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "los": 2}\n')
    with pytest.raises(ContractError, match="line 1"):
        read_metrics(tmp_path)
