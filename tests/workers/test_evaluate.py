"""Metrics against values computed by hand on small fixtures."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from core.stats import expected_calibration_error, mcnemar_test, wilson_interval
from workers.evaluation.evaluate import compare_models, compute_metrics, evaluate_runs
from core.specs.evaluate import EvaluateSpec

LABELS = ["A", "B"]


def pred(item_id, label, gold, probs=None, follows=None, error=None):
    return {"item_id": str(item_id), "label": label, "gold": gold, "probs": probs,
            "follows_instruction": follows, "error": error}


@pytest.fixture
def seven():
    """(gold, predicted): AA AA AB BB BA B- CB; C is a class the model was never trained on."""
    return [pred(1, "A", "A"), pred(2, "A", "A"), pred(3, "B", "A"), pred(4, "B", "B"), pred(5, "A", "B"),
            pred(6, None, "B", error="no label in answer"), pred(7, "B", "C")]


def test_wilson_interval_hand_values():
    # p = 3/7, z = 1.96: centre (p + z²/2n)/(1 + z²/n) = 0.45388, half-width 0.29566.
    lo, hi = wilson_interval(3, 7)
    assert lo == pytest.approx(0.158220, abs=1e-5)
    assert hi == pytest.approx(0.749542, abs=1e-5)
    lo, hi = wilson_interval(2, 3)
    assert (lo, hi) == pytest.approx((0.207660, 0.938508), abs=1e-5)
    # All right: the interval stays below 1 on the low side and ends at 1.
    lo, hi = wilson_interval(10, 10)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(0.722467, abs=1e-5)
    assert wilson_interval(0, 0) is None
    with pytest.raises(ValueError):
        wilson_interval(5, 3)


def test_accuracy_counts_failed_and_unknown_as_wrong(seven):
    m = compute_metrics(seven, LABELS, bootstrap=0)
    assert m["n"] == 7 and m["n_correct"] == 3 and m["n_failed"] == 1
    assert m["accuracy"]["value"] == pytest.approx(3 / 7)
    assert m["accuracy"]["ci"] == pytest.approx([0.158220, 0.749542], abs=1e-5)
    assert m["failed"] == {"item_ids": ["6"], "reasons": {"no label in answer": 1}}
    assert m["unknown_labels"] == {"labels": {"C": 1}, "n_items": 1}


def test_per_class_and_macro_f1(seven):
    m = compute_metrics(seven, LABELS, bootstrap=0)
    a, b, c = m["per_class"]["A"], m["per_class"]["B"], m["per_class"]["C"]
    # A: gold {1,2,3}, predicted {1,2,5}, TP 2.   B: gold {4,5,6}, predicted {3,4,7}, TP 1.
    assert (a["precision"], a["recall"], a["f1"], a["support"]) == pytest.approx((2 / 3, 2 / 3, 2 / 3, 3))
    assert (b["precision"], b["recall"], b["f1"], b["support"]) == pytest.approx((1 / 3, 1 / 3, 1 / 3, 3))
    assert (c["precision"], c["recall"], c["f1"], c["support"]) == (0.0, 0.0, 0.0, 1)
    assert c["trained"] is False and a["trained"] is True
    assert m["macro_f1"]["value"] == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)
    assert m["macro_f1"]["ci"] is None


def test_confusion_matrix(seven):
    cm = compute_metrics(seven, LABELS, bootstrap=0)["confusion"]
    assert cm["rows"] == ["A", "B", "C"]
    assert cm["cols"] == ["A", "B", "failed"]
    assert cm["counts"] == [[2, 1, 0], [1, 1, 1], [0, 1, 0]]


def test_out_of_set_answers_get_their_own_column():
    m = compute_metrics([pred(1, "A", "A"), pred(2, "Politics", "B")], LABELS, bootstrap=0)
    assert m["confusion"]["cols"] == ["A", "B", "other", "failed"]
    assert m["confusion"]["counts"] == [[1, 0, 0, 0], [0, 0, 1, 0]]
    assert m["n_failed"] == 0 and m["n_correct"] == 1
    assert m["per_class"]["B"]["recall"] == 0.0


def test_macro_f1_bootstrap_matches_a_naive_resample(seven):
    boot, seed = 40, 3
    m = compute_metrics(seven, LABELS, bootstrap=boot, seed=seed)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(seven), size=(boot, len(seven)))
    naive = []
    for row in idx:
        sample = [dict(seven[i], item_id=f"{k}") for k, i in enumerate(row)]
        naive.append(compute_metrics(sample, LABELS, bootstrap=0)["macro_f1"]["value"])
    lo, hi = np.percentile(naive, [2.5, 97.5])
    assert m["macro_f1"]["ci"] == pytest.approx([lo, hi], abs=1e-12)
    assert lo < m["macro_f1"]["value"] < hi


def test_perfect_predictions_have_degenerate_intervals():
    preds = [pred(i, "AB"[i % 2], "AB"[i % 2]) for i in range(20)]
    m = compute_metrics(preds, LABELS, bootstrap=100)
    assert m["accuracy"]["value"] == 1.0 and m["macro_f1"]["value"] == 1.0
    assert m["macro_f1"]["ci"] == [1.0, 1.0]


def test_ece_two_bin_hand_example():
    # bin (0, .5]: conf .2 .4 -> mean .3, accuracy .5;  bin (.5, 1]: conf .6 .9 -> mean .75, accuracy 1.
    # ECE = 2/4 * |.5 - .3| + 2/4 * |1 - .75| = .1 + .125
    out = expected_calibration_error([0.2, 0.4, 0.6, 0.9], [False, True, True, True], n_bins=2)
    assert out["ece"] == pytest.approx(0.225)
    assert [b["n"] for b in out["bins"]] == [2, 2]
    assert out["bins"][0]["confidence"] == pytest.approx(0.3)
    # 0.5 is the top edge of the first bin; 0 belongs to the first bin too.
    edge = expected_calibration_error([0.5, 0.0], [True, False], n_bins=2)
    assert [b["n"] for b in edge["bins"]] == [2]
    assert edge["ece"] == pytest.approx(abs(0.5 - 0.25))
    assert expected_calibration_error([], [], n_bins=2)["ece"] is None
    with pytest.raises(ValueError, match="probabilities"):
        expected_calibration_error([1.5], [True])


def test_ece_from_score_probabilities():
    probs = {"A": 0.7, "B": 0.3}
    preds = [pred(1, "A", "A", probs), pred(2, "A", "A", probs), pred(3, "A", "A", probs), pred(4, "A", "B", probs),
             pred(5, None, "B")]  # failed without scores: not in the calibration set
    cal = compute_metrics(preds, LABELS, bootstrap=0)["calibration"]
    assert cal["n"] == 4 and cal["n_bins"] == 15
    assert cal["ece"] == pytest.approx(abs(0.75 - 0.7))


def test_instruction_following_rate():
    preds = [pred(1, "A", "A", follows=True), pred(2, "B", "A", follows=True), pred(3, None, "B", follows=False),
             pred(4, "A", "A")]
    f = compute_metrics(preds, LABELS, bootstrap=0)["instruction_following"]
    assert (f["k"], f["n"]) == (2, 3)
    assert f["value"] == pytest.approx(2 / 3)
    assert f["ci"] == pytest.approx([0.207660, 0.938508], abs=1e-5)
    assert compute_metrics([pred(1, "A", "A")], LABELS, bootstrap=0)["instruction_following"] is None


def test_mcnemar_exact_and_chi_square():
    exact = mcnemar_test(1, 6)  # 2 * (C(7,0) + C(7,1)) / 2^7
    assert exact["method"] == "exact" and exact["p_value"] == pytest.approx(0.125)
    assert mcnemar_test(3, 3)["p_value"] == pytest.approx(1.0)
    chi = mcnemar_test(10, 25)  # (|10 - 25| - 1)^2 / 35 = 5.6; P(chi2_1 > 5.6) = 0.017960
    assert chi["method"] == "chi2_cc"
    assert chi["statistic"] == pytest.approx(5.6)
    assert chi["p_value"] == pytest.approx(0.0179605, abs=1e-6)
    assert mcnemar_test(12, 12)["method"] == "exact"  # 24 discordant pairs: still exact
    assert mcnemar_test(12, 13)["method"] == "chi2_cc"
    assert mcnemar_test(0, 0) == {"method": "none", "statistic": None, "p_value": 1.0}


def test_compare_models_paired():
    a, b = [], []
    cases = ["rw"] * 1 + ["wr"] * 6 + ["rr"] * 3 + ["ww"] * 2  # a right/wrong, b right/wrong
    for i, case in enumerate(cases):
        a.append(pred(i, "A" if case[0] == "r" else "B", "A"))
        b.append(pred(i, "A" if case[1] == "r" else None, "A"))
    a.append(pred("only-a", "A", "A"))
    b.append(pred("only-b", "A", "A"))
    cmp = compare_models(a, b, bootstrap=200)
    assert cmp["n_paired"] == 12 and (cmp["b"], cmp["c"]) == (1, 6)
    assert cmp["mcnemar"]["p_value"] == pytest.approx(0.125)
    assert cmp["accuracy_a"] == pytest.approx(4 / 12) and cmp["accuracy_b"] == pytest.approx(9 / 12)
    assert cmp["difference"]["value"] == pytest.approx(5 / 12)
    lo, hi = cmp["difference"]["ci"]
    assert -1 <= lo < 5 / 12 < hi <= 1
    assert cmp["missing"] == {"only_in_a": ["only-a"], "only_in_b": ["only-b"], "n_only_in_a": 1, "n_only_in_b": 1}


def test_compare_models_refuses_different_gold_and_disjoint_runs():
    with pytest.raises(ValueError, match="not over the same labeled items"):
        compare_models([pred(1, "A", "A")], [pred(1, "A", "B")])
    with pytest.raises(ValueError, match="share no item"):
        compare_models([pred(1, "A", "A")], [pred(2, "A", "A")])


@pytest.mark.parametrize("preds, labels, message", [
    ([], LABELS, "empty"),
    ([pred(1, "A", None)], LABELS, "no gold label"),
    ([pred(1, "A", "A"), pred(1, "B", "B")], LABELS, "appears twice"),
    ([pred(1, "A", "A")], [], "label_names is empty"),
    ([{"label": "A", "gold": "A"}], LABELS, "no item_id"),
])
def test_bad_input_is_refused_clearly(preds, labels, message):
    with pytest.raises(ValueError, match=message):
        compute_metrics(preds, labels)


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
    from workers.evaluation.baseline import BaselineCorpus
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
    from workers.evaluation.baseline import BaselineCorpus
    ev = evaluate_runs({"base": seven}, LABELS)
    assert ev["baseline"] is None and any("no classical baseline" in m for m in ev["missing"])
    other = BaselineCorpus(train_texts=["a", "b"], train_labels=["A", "B"], items={"x": ("a", "A")}, source="elsewhere")
    ev = evaluate_runs({"base": seven}, LABELS, baseline=other)
    assert ev["baseline"] is None
    assert any("no classical baseline: none of the 7 evaluated items is in elsewhere" in m for m in ev["missing"])


def test_the_evaluate_stage_fits_the_baseline_on_the_prepared_train_split(ag_news_dir, tmp_path):
    """run_evaluation (what the evaluate job calls) on a real prep artifact: the baseline is fitted on its
    train split, scored on the classified test items, and the document passes its contract."""
    from core.context import LocalContext
    from workers.evaluation.evaluate import EvaluationInputs, run_evaluation
    from workers.data.prep import load_records, prepare_dataset, read_meta
    from core.specs.prep import PrepSpec, SourceSpec
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
