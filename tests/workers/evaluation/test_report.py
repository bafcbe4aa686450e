"""The HTML report and the terminal table, from a small fixture evaluation."""
from __future__ import annotations

import base64
import json
import re

import pytest

from workers.evaluation.baseline import BaselineCorpus
from workers.evaluation.evaluate import evaluate_runs
from workers.evaluation.report import render_table, summary_rows, write_report
from core.specs.evaluate import EvaluateSpec

LABELS = ["World", "Sports", "Business", "Sci/Tech"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def preds(n_right: int, *, failed: int = 0) -> list[dict]:
    out = []
    for i in range(40):
        gold = LABELS[i % 4]
        label = gold if i < n_right else LABELS[(i + 1) % 4]
        if i >= 40 - failed:
            label = None
        probs = None if label is None else {lab: (0.7 if lab == label else 0.1) for lab in LABELS}
        out.append({"item_id": f"n{i}", "label": label, "gold": gold, "probs": probs,
                    "follows_instruction": label is not None, "error": None if label else "no label"})
    return out


def judge_rows(shift: int) -> list[dict]:
    rows = [{"item_id": f"d{i}", "status": "scored", "coherence": 30 + shift + 5 * i, "following": 20 + shift + 4 * i,
             "backend": "ollama", "judge_model": "deepseek-r1:8b", "model_digest": "sha256:abcd",
             "rubric_version": "newslora-judge-v1", "latency_ms": 50.0, "error_kind": None} for i in range(8)]
    rows.append({"item_id": "d9", "status": "unscored", "coherence": None, "following": None, "backend": "ollama",
                 "judge_model": "deepseek-r1:8b", "model_digest": "sha256:abcd", "latency_ms": 40.0,
                 "error_kind": "unparseable", "error": "no scores"})
    return rows


WORDS = {"World": "minister election government", "Sports": "match goal team", "Business": "profits shares market",
         "Sci/Tech": "software internet chip"}


def baseline_corpus() -> BaselineCorpus:
    """The baseline reads item n{i} as its gold class's words, but n36-n39 as another class's: 36 of 40 right."""
    items = {f"n{i}": (f"{WORDS[LABELS[(i + (2 if i >= 36 else 0)) % 4]]} {i}", LABELS[i % 4]) for i in range(40)}
    texts = [f"{w} {k}" for w in WORDS.values() for k in ("today", "news", "report")]
    return BaselineCorpus(train_texts=texts, train_labels=[lab for lab in WORDS for _ in range(3)], items=items,
                          source="fixture")


@pytest.fixture
def evaluation() -> dict:
    return evaluate_runs({"base": preds(14, failed=3), "lora": preds(34)}, LABELS,
                         {"base": judge_rows(0), "lora": judge_rows(20)},
                         EvaluateSpec(classify_job_ids=[1, 2], bootstrap=100, name="AG News: base vs LoRA"),
                         generate_runs={"base": preds(12, failed=6), "lora": preds(33)},
                         dialogue={"base": judge_rows(30), "lora": judge_rows(25)}, baseline=baseline_corpus())


def test_report_has_sections_and_valid_pngs(evaluation, tmp_path):
    loss = [{"step": s, "loss": 2.0 / (1 + s / 10)} for s in range(0, 101, 5)]
    loss += [{"step": s, "eval_loss": 2.2 / (1 + s / 12)} for s in range(0, 101, 20)]  # the other spelling
    loss += [{"type": "eval", "step": s, "val_loss": 1.0, "val_accuracy": 0.5 + s / 250, "train_s": 3.1 * s}
             for s in range(20, 101, 20)]
    path = write_report(evaluation, tmp_path / "out", loss_history=loss)
    assert path == tmp_path / "out" / "report.html"
    page = path.read_text()
    for section in ("id='summary'", "id='per-class'", "id='confusion'", "id='f1'", "id='calibration'", "id='loss'",
                    "id='time-to-accuracy'", "id='judge'", "id='dialogue'", "id='missing'"):
        assert section in page
    assert "AG News: base vs LoRA" in page and "McNemar" in page and "Sci/Tech" in page
    assert "tfidf-svm: TF-IDF (word 1-2 grams, sublinear tf)" in page and "fitted on 12 training texts" in page
    assert "no data" not in page
    pngs = ["confusion.png", "per_class_f1.png", "calibration.png", "loss.png", "time_to_accuracy.png",
            "judge_scores.png", "dialogue_scores.png"]
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == len(pngs)
    for name, b64 in zip(pngs, embedded):
        data = (tmp_path / "out" / name).read_bytes()
        assert len(data) > 1000 and data[:8] == PNG_MAGIC
        assert base64.b64decode(b64) == data  # the page is self-contained: the same image inline
    assert "<script" not in page and "http" not in page.split("<body>")[1]  # nothing fetched from outside


def test_summary_numbers(evaluation):
    header, rows = summary_rows(evaluation)
    assert header == ["metric", "base", "lora", "tfidf-svm", "lora − base", "lora − tfidf-svm"]
    assert all(len(r) == len(header) for r in rows)
    table = {r[0]: [c for i, c in enumerate(r[1:]) if i not in (2, 4)] for r in rows}  # the baseline's cells below
    bl = {r[0]: (r[3], r[5]) for r in rows}
    assert bl["accuracy (95% CI)"][0].startswith("90.0% [")  # 36 of 40
    # lora is wrong on n34-n39, the baseline on n36-n39: b = 2 (baseline right, lora wrong), c = 0.
    assert bl["accuracy (95% CI)"][1].startswith("-5.0 pts") and "McNemar p = 0.500 (b=2, c=0)" in bl["accuracy (95% CI)"][1]
    assert bl["failed items (counted wrong)"] == ("0 of 40", "")
    assert bl["instruction following (95% CI)"] == ("–", "") and bl["judge: coherence 0-100 (95% CI)"] == ("–", "")
    assert table["accuracy (95% CI)"][0].startswith("35.0% [")  # 14 of 40
    assert table["accuracy (95% CI)"][1].startswith("85.0% [")  # 34 of 40
    assert "+50.0 pts" in table["accuracy (95% CI)"][2] and "McNemar p < 0.001 (b=0, c=20)" in table["accuracy (95% CI)"][2]
    assert table["failed items (counted wrong)"][:2] == ["3 of 40", "0 of 40"]
    assert table["instruction following (95% CI)"][0].startswith("85.0%")  # 34 of 40 answered
    assert table["judge: coherence 0-100 (95% CI)"][0].startswith("47.5 [")  # mean of 30..65 step 5
    assert "unscored 1" in table["judge: coherence 0-100 (95% CI)"][0]
    assert table["judge: coherence 0-100 (95% CI)"][2].startswith("+20.0")
    # The general-instruction set got worse after fine-tuning: the table says so.
    assert table["general instructions, judge: coherence 0-100 (95% CI)"][2].startswith("-5.0")
    assert table["general instructions, judge: instruction following 0-100 (95% CI)"][1].startswith("59.0 [")


def test_report_without_judge_or_loss(tmp_path):
    ev = evaluate_runs({"only": preds(20)}, LABELS, None, EvaluateSpec(classify_job_ids=[1], bootstrap=20))
    page = write_report(ev, tmp_path).read_text()
    assert "loss curves: no data" in page and "judge score distributions: no data" in page
    assert "validation accuracy against training seconds: no data" in page and "no classical baseline" in page
    assert "general-instruction score distributions: no data" in page
    assert not (tmp_path / "loss.png").exists() and (tmp_path / "confusion.png").exists()
    assert "only one model" in page


def test_report_refuses_empty(tmp_path):
    with pytest.raises(ValueError, match="no models"):
        write_report({}, tmp_path)


def test_render_table(evaluation):
    text = render_table(evaluation)
    assert "accuracy (95% CI)" in text and "lora − base" in text and "Sci/Tech" in text
    assert "lora − tfidf-svm" in text and "tfidf-svm F1" in text and "fitted on 12 texts" in text
    assert "85.0%" in text and "\x1b[" not in text  # plain text, no colour codes


def test_stored_judge_summaries_of_older_code_still_render(evaluation, tmp_path):
    """Evaluations stored before the judge summary had its contract (no format_version) render as they did, and
    so do summaries of the first judge (no scales, partial count, control set, evidence or rubric)."""
    stored = json.loads(json.dumps(evaluation))
    for block in ("judge", "dialogue"):
        for s in stored[block].values():
            del s["format_version"]
    assert summary_rows(stored) == summary_rows(evaluation)
    for block in ("judge", "dialogue"):
        for s in stored[block].values():
            for key in ("scales", "n_partial", "validity", "evidence", "rubric", "scoring", "spread"):
                del s[key]
    table = {r[0]: r for r in summary_rows(stored)[1]}
    coherence = table["judge: coherence 0-100 (95% CI)"][1]
    assert coherence.startswith("47.5 [") and "unscored 1" in coherence
    assert "not evidence" not in coherence  # before the control set, scores were not labelled; today they are
    assert "not evidence" in {r[0]: r for r in summary_rows(evaluation)[1]}["judge: coherence 0-100 (95% CI)"][1]
    assert table["judge: validity, prefers the correct answer (95% CI)"][1] == "no control set: not evidence"
    assert "no control pairs were scored" in render_table(stored)
    assert "AG News: base vs LoRA" in write_report(stored, tmp_path).read_text()
    assert (tmp_path / "judge_scores.png").exists() and (tmp_path / "dialogue_scores.png").exists()
