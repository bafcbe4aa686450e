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
from db.session import session_scope
from tests.conftest import make_dataset_meta


def _all_set(row) -> None:
    """The fixture row sets every field to a non-default value, so a field the store drops is seen."""
    unset = set(type(row).model_fields) - row.model_fields_set - {"format_version"}
    assert not unset, f"the test row leaves {sorted(unset)} at their defaults: set them, so their round trip is checked"


PREDICTION = PredictionRow(item_id="item-7", seq=3, label="Sports", gold="World",
                           probs={"World": 0.25, "Sports": 0.75}, response="Sports.", follows_instruction=True,
                           latency_ms=12.5, flags=["truncated"], error="late", model="smollm2-135m", adapter_id=4)
JUDGE = JudgeRow(item_id="item-7", status="scored", coherence=80.0, following=None, reason="clear",
                 judge_backend="ollama", judge_model="deepseek-r1:8b", judge_digest="sha256:abc", latency_ms=950.0,
                 raw='{"score": 80}', error="retried once", error_kind="timeout", rubric_version="raschka-1",
                 rubric_sha="0f0f", attempts=2, thinking_chars=1200, parse="json")


def test_fixture_rows_set_every_field():
    _all_set(PREDICTION)
    for name in JudgeRow.model_fields:  # JudgeRow grows with the judge: set what the fixture knows
        if name not in JUDGE.model_fields_set and name != "format_version":
            setattr(JUDGE, name, _non_default(JudgeRow, name))
    _all_set(JUDGE)


def _non_default(cls, name):
    import typing
    field = cls.model_fields[name]
    for arg in (field.annotation, *typing.get_args(field.annotation)):
        if typing.get_origin(arg) is typing.Literal:
            return next(v for v in typing.get_args(arg) if v != field.default)
    ann = str(field.annotation)
    for kind, value in (("dict", {"k": 1.0}), ("list", ["x"]), ("bool", True), ("float", 0.5), ("int", 3)):
        if kind in ann:
            return value
    return "value"


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
