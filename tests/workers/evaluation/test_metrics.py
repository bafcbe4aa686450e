"""Metrics against values computed by hand on small fixtures."""
from __future__ import annotations

import numpy as np
import pytest

from tests.workers.evaluation.predictions import LABELS, pred
from workers.evaluation.metrics import compare_models, compute_metrics


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
