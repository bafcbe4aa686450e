"""The evaluation document: metrics, comparisons, judge summaries and the classical baseline together,
and the evaluate stage on a real prepared dataset."""
from __future__ import annotations

import json
import math

import pytest

from core.context import LocalContext
from core.specs.evaluate import EvaluateSpec
from core.specs.prep import PrepSpec, SourceSpec
from tests.workers.evaluation.predictions import LABELS, pred
from workers.data.prep import load_records, prepare_dataset, read_meta
from workers.evaluation.baseline import BaselineCorpus
from workers.evaluation.evaluate import EvaluationInputs, evaluate_runs, run_evaluation


def test_evaluate_runs_document_is_json(seven):
    improved = [dict(p, label=p["gold"] if p["gold"] in LABELS else "A") for p in seven]
    judge_rows = lambda m: [{"item_id": str(i), "status": "scored", "coherence": m + i, "following": m,  # noqa: E731
                             "error_kind": None} for i in range(4)] + [
        {"item_id": "9", "status": "unscored", "coherence": None, "following": None, "error_kind": "unparseable"}]
    ev = evaluate_runs({"base": seven, "lora": improved}, LABELS,
                       {"base": judge_rows(40), "lora": judge_rows(60)},
                       EvaluateSpec(classify_job_ids=[1, 2], bootstrap=50, name="t"),
                       generate_runs={"base": [dict(p, follows_instruction=p["label"] is not None) for p in seven]},
                       dialogue={"base": judge_rows(50), "lora": judge_rows(45)})
    json.dumps(ev, allow_nan=False)
    assert ev["base"] == "base" and list(ev["models"]) == ["base", "lora"]
    assert ev["models"]["lora"]["accuracy"]["value"] == pytest.approx(6 / 7)
    cmp = ev["comparisons"]["lora"]
    assert (cmp["b"], cmp["c"]) == (0, 3)  # items 3, 5, 6 fixed; the unknown-class item stays wrong
    assert ev["generate"]["base"]["instruction_following"]["k"] == 6
    assert ev["judge"]["lora"]["n_unscored"] == 1 and ev["judge"]["lora"]["n_scored"] == 4
    assert ev["judge"]["lora"]["coherence"]["mean"] == pytest.approx(61.5)
    assert ev["judge_comparisons"]["lora"]["coherence"]["mean"] == pytest.approx(20.0)
    assert ev["dialogue"]["base"]["following"]["mean"] == pytest.approx(50.0)
    assert ev["dialogue_comparisons"]["lora"]["following"]["mean"] == pytest.approx(-5.0)
    assert any("general-instruction answers" in m for m in ev["missing"])
    assert any("not trained on" in m for m in ev["missing"])
    assert any("no score probabilities" in m for m in ev["missing"])
    assert any("could not score 1 of 5" in m for m in ev["missing"])
    assert ev["spec"]["name"] == "t"
    assert not math.isnan(ev["models"]["base"]["macro_f1"]["value"])


def test_evaluate_runs_names_the_bad_run(seven):
    with pytest.raises(ValueError, match="run 'lora'"):
        evaluate_runs({"base": seven, "lora": []}, LABELS)


def test_evaluate_runs_without_spec_and_softmax_rounding():
    probs = {"A": 1.0000001, "B": 0.0}  # float error from a softmax is accepted (and clipped)
    ev = evaluate_runs({"m": [pred(1, "A", "A", probs), pred(2, "B", "B", {"A": 0.4, "B": 0.6})]}, LABELS)
    assert ev["spec"] is None and ev["name"] is None
    assert ev["models"]["m"]["calibration"]["ece"] == pytest.approx((0.0 + 0.4) / 2)
    assert any("only one model" in m for m in ev["missing"])


def test_evaluate_runs_fits_the_classical_baseline_and_pairs_it_with_each_model():
    corpus = BaselineCorpus(
        train_texts=["apple alpha", "alpha apple pie", "apple tree alpha", "banana beta", "beta banana split",
                     "banana boat beta"],
        train_labels=["A"] * 3 + ["B"] * 3,
        # The baseline gets 1-3 right and calls 4 ("apple", gold B) A.
        items={"1": ("apple alpha", "A"), "2": ("banana beta", "B"), "3": ("apple", "A"), "4": ("apple fruit", "B"),
               "5": ("not evaluated", "A")}, source="tiny")
    base = [pred(i, "B", g) for i, g in ((1, "A"), (2, "B"), (3, "A"), (4, "B"))]  # right on 2 and 4
    lora = [pred(1, "A", "A"), pred(2, "B", "B"), pred(3, "B", "A"), pred(4, "B", "B")]  # wrong on 3 only
    ev = evaluate_runs({"base": base, "lora": lora}, LABELS, spec=EvaluateSpec(classify_job_ids=[1, 2], bootstrap=0),
                       baseline=corpus)
    json.dumps(ev, allow_nan=False)
    bl = ev["baseline"]
    assert bl["name"] == "tfidf-svm" and bl["n_train"] == 6 and bl["n_items"] == 4 and bl["n_not_found"] == 0
    assert bl["metrics"]["accuracy"]["value"] == pytest.approx(3 / 4)
    assert bl["metrics"]["confusion"]["counts"] == [[2, 0, 0], [1, 1, 0]]
    lo = bl["comparisons"]["lora"]  # a = the baseline, b = the model: difference is model - baseline
    assert (lo["b"], lo["c"]) == (1, 1) and lo["difference"]["value"] == pytest.approx(0.0)
    assert lo["mcnemar"] == {"method": "exact", "statistic": 1.0, "p_value": 1.0}
    ba = bl["comparisons"]["base"]
    assert (ba["b"], ba["c"]) == (2, 1) and ba["difference"]["value"] == pytest.approx(-1 / 4)
    assert "tfidf-svm" not in ev["models"]  # the models are the classify runs; the baseline has its own block


def test_evaluate_runs_notes_a_missing_baseline(seven):
    ev = evaluate_runs({"base": seven}, LABELS)
    assert ev["baseline"] is None and any("no classical baseline" in m for m in ev["missing"])
    other = BaselineCorpus(train_texts=["a", "b"], train_labels=["A", "B"], items={"x": ("a", "A")}, source="elsewhere")
    ev = evaluate_runs({"base": seven}, LABELS, baseline=other)
    assert ev["baseline"] is None
    assert any("no classical baseline: none of the 7 evaluated items is in elsewhere" in m for m in ev["missing"])


def test_the_evaluate_stage_fits_the_baseline_on_the_prepared_train_split(ag_news_dir, tmp_path):
    """run_evaluation (what the evaluate job calls) on a real prep artifact: the baseline is fitted on its
    train split, scored on the classified test items, and the document passes its contract."""
    spec = PrepSpec(train=SourceSpec(path=str(ag_news_dir / "train.jsonl")),
                    test=SourceSpec(path=str(ag_news_dir / "test.csv")), max_per_class=150, test_max_per_class=10)
    ctx = LocalContext(work_dir=tmp_path)
    prepare_dataset(spec, tmp_path / "ds", ctx)
    test = load_records(tmp_path / "ds", "test")
    names = list(read_meta(tmp_path / "ds").label_names)
    base = [pred(r["id"], names[0], r["output"]) for r in test]  # always the first class
    tuned = [pred(r["id"], r["output"], r["output"]) for r in test[:-3]]  # right, 3 items not classified
    doc, report = run_evaluation(EvaluateSpec(classify_job_ids=[1, 2], bootstrap=0, report=False),
                                 EvaluationInputs(runs={"base": base, "fine-tuned": tuned}, label_names=names,
                                                  dataset_dir=tmp_path / "ds"), ctx, report_dir=tmp_path / "r")
    bl = doc.baseline
    assert report is None and bl["n_items"] == 40 and bl["n_train"] > 500
    assert 0.5 < bl["metrics"]["accuracy"]["value"] <= 1.0  # 600 training articles: well above chance (0.25)
    assert bl["comparisons"]["fine-tuned"]["n_paired"] == 37 and bl["comparisons"]["fine-tuned"]["b"] == 0
