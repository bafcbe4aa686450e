"""Evaluation metrics: pure functions over per-item predictions, with honest uncertainty.

A prediction is one dict per item, as the classify job stores it:

    {"item_id": str, "label": str | None, "gold": str, "probs": {label: p} | None,
     "follows_instruction": bool | None, "error": str | None}

`label` None means the model gave no usable answer (a failed item): it counts as wrong and is reported
as failed, never dropped. Gold labels outside `label_names` (classes the model was never trained on)
are reported and count as wrong too.

Everything returned is plain JSON (floats, ints, strings, lists, dicts, None) so it can be stored in the
evaluation document and rendered by `workers.evaluation.report` without this module.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from core.stats import expected_calibration_error, mcnemar_test, percentile_ci, wilson_interval

MAX_LISTED_IDS = 100  # missing/failed item ids listed in a result; the counts are always complete

Pred = Mapping[str, Any]


# --------------------------------------------------------------------------------------------------
# One model


def _check_preds(preds: Sequence[Pred], who: str = "predictions") -> None:
    if not preds:
        raise ValueError(f"{who} is empty: evaluation needs at least one labeled prediction")
    seen: set[str] = set()
    for i, p in enumerate(preds):
        if "item_id" not in p:
            raise ValueError(f"{who}[{i}] has no item_id: each prediction needs item_id, label and gold")
        iid = str(p["item_id"])
        if iid in seen:
            raise ValueError(f"{who}: item {iid!r} appears twice; store one prediction per item")
        seen.add(iid)
        if p.get("gold") is None:
            raise ValueError(f"{who}: item {iid!r} has no gold label; evaluate labeled items only "
                             f"(classify a dataset split or items with a 'label')")


def _is_correct(p: Pred, known: set[str]) -> bool:
    return p.get("label") is not None and p["gold"] in known and p["label"] == p["gold"]


def _macro_f1_from_counts(conf: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Macro-F1 from confusion counts.

    Args:
        conf: (..., K, K + 1) counts: gold rows, predicted columns over the same K classes, then one
            column of items with no in-class answer (failed or out-of-set: false negatives only).
        classes: (K_gold,) bool, which classes take part in the average.
    Returns:
        (...,) macro-F1 over participating classes that have support or predictions.
    """
    k = conf.shape[-2]
    tp = np.diagonal(conf[..., :k], axis1=-2, axis2=-1)  # (..., K)
    support = conf.sum(-1)  # (..., K)
    predicted = conf[..., :k].sum(-2)  # (..., K)
    denom = support + predicted
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)  # 2TP / (2TP + FP + FN)
    present = (denom > 0) & classes
    n_present = present.sum(-1)
    return np.where(n_present > 0, (f1 * present).sum(-1) / np.maximum(n_present, 1), np.nan)


def compute_metrics(preds: Sequence[Pred], label_names: Sequence[str], *, bootstrap: int = 1000,
                    seed: int = 0) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class scores, confusion matrix, calibration and instruction following.

    Args:
        preds: one dict per item (see the module docstring).
        label_names: the labels the model was trained to give, in display order.
        bootstrap: resamples for the macro-F1 interval (0 skips it).
        seed: the bootstrap's random seed.

    Returns:
        A JSON-ready dict: n, n_correct, n_failed, failed (ids and reasons), accuracy {value, ci},
        macro_f1 {value, ci}, per_class {label: precision, recall, f1, support, predicted}, confusion
        {rows (gold), cols (predicted, then "other" when out-of-set answers occur, then "failed"),
        counts}, calibration {ece, n, n_bins, bins}, instruction_following {value, ci, k, n} | None,
        unknown_labels {labels: {label: count}, n_items}.

        Macro-F1 averages F1 over classes that occur as gold or prediction, gold classes the model was
        never trained on included (their F1 is 0).

    Raises:
        ValueError: empty or malformed predictions, duplicate item ids, items without gold, no labels.
    """
    label_names = list(label_names)
    if not label_names:
        raise ValueError("label_names is empty: pass the labels the model was trained on")
    if len(set(label_names)) != len(label_names):
        raise ValueError(f"label_names has duplicates: {label_names}")
    _check_preds(preds)
    known = set(label_names)
    n = len(preds)

    unknown = Counter(str(p["gold"]) for p in preds if p["gold"] not in known)
    rows = label_names + sorted(unknown)  # gold classes
    has_other = any(p.get("label") is not None and p["label"] not in known for p in preds)
    cols = label_names + (["other"] if has_other else []) + ["failed"]
    row_of = {lab: i for i, lab in enumerate(rows)}
    other_col, failed_col = (len(label_names), len(label_names) + 1) if has_other else (None, len(label_names))

    gold_idx = np.empty(n, dtype=np.int64)
    pred_idx = np.empty(n, dtype=np.int64)
    for i, p in enumerate(preds):
        gold_idx[i] = row_of[str(p["gold"])]
        lab = p.get("label")
        pred_idx[i] = failed_col if lab is None else (label_names.index(lab) if lab in known else other_col)
    k_rows, k_cols = len(rows), len(cols)
    counts = np.zeros((k_rows, k_cols), dtype=np.int64)
    np.add.at(counts, (gold_idx, pred_idx), 1)

    correct = np.array([_is_correct(p, known) for p in preds])
    n_correct = int(correct.sum())
    failed = [p for p in preds if p.get("label") is None]

    # F1 bookkeeping on a (rows, rows + 1) matrix: predicted columns over the gold classes (unknown gold
    # classes are never predicted), then one column for failed and out-of-set answers (FN only).
    n_lab = len(label_names)
    full = np.zeros((k_rows, k_rows + 1), dtype=np.float64)
    full[:, :n_lab] = counts[:, :n_lab]
    full[:, k_rows] = counts[:, n_lab:].sum(1)
    in_avg = np.ones(k_rows, dtype=bool)
    per_class = {}
    for j, lab in enumerate(rows):
        tp = int(full[j, j])
        support = int(counts[j].sum())
        predicted = int(full[:k_rows, j].sum()) if j < n_lab else 0
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[lab] = {"precision": precision, "recall": recall, "f1": f1, "support": support,
                          "predicted": predicted, "trained": lab in known}
    macro = float(_macro_f1_from_counts(full[None], in_avg)[0])

    macro_ci = None
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        # Column of each item in `full`: its predicted class, or the last column when failed/out-of-set.
        col = np.where(pred_idx < n_lab, pred_idx, k_rows)
        idx = rng.integers(0, n, size=(bootstrap, n))  # (B, n) resampled item positions
        cell = (np.arange(bootstrap)[:, None] * k_rows + gold_idx[idx]) * (k_rows + 1) + col[idx]  # (B, n)
        boot = np.bincount(cell.ravel(), minlength=bootstrap * k_rows * (k_rows + 1))
        boot = boot.reshape(bootstrap, k_rows, k_rows + 1).astype(np.float64)  # (B, K, K + 1)
        macro_ci = percentile_ci(_macro_f1_from_counts(boot, in_avg))

    # Calibration: the probability the model gave its own answer, over items with scores.
    conf, hit = [], []
    for p in preds:
        probs = p.get("probs")
        if not probs:
            continue
        lab = p.get("label")
        c = probs.get(lab) if lab is not None and lab in probs else max(probs.values())
        conf.append(float(c))
        hit.append(bool(_is_correct(p, known)))
    calibration = expected_calibration_error(conf, hit)

    follows = [p.get("follows_instruction") for p in preds if p.get("follows_instruction") is not None]
    following = None
    if follows:
        k = sum(bool(f) for f in follows)
        following = {"value": k / len(follows), "ci": list(wilson_interval(k, len(follows))), "k": k,
                     "n": len(follows)}

    reasons = Counter(str(p.get("error") or "no answer") for p in failed)
    return {
        "n": n,
        "n_correct": n_correct,
        "n_failed": len(failed),
        "failed": {"item_ids": [str(p["item_id"]) for p in failed][:MAX_LISTED_IDS],
                   "reasons": dict(reasons.most_common(10))},
        "accuracy": {"value": n_correct / n, "ci": list(wilson_interval(n_correct, n)), "method": "wilson"},
        "macro_f1": {"value": macro, "ci": macro_ci, "method": "bootstrap", "n_boot": bootstrap},
        "per_class": per_class,
        "confusion": {"rows": rows, "cols": cols, "counts": counts.tolist()},
        "calibration": calibration,
        "instruction_following": following,
        "unknown_labels": {"labels": dict(unknown), "n_items": int(sum(unknown.values()))},
    }


# --------------------------------------------------------------------------------------------------
# Two models


def compare_models(preds_a: Sequence[Pred], preds_b: Sequence[Pred], *, label_names: Iterable[str] | None = None,
                   bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Paired comparison of two models on the items both predicted.

    Args:
        preds_a: the reference model's predictions (the base).
        preds_b: the other model's predictions (the fine-tuned one).
        label_names: the trained labels; gold labels outside them count as wrong (as in compute_metrics).
            None: every gold label counts.
        bootstrap: paired resamples for the accuracy-difference interval (0 skips it).

    Returns:
        {n_paired, accuracy_a, accuracy_b, difference {value (b - a), ci}, b (a right, b wrong),
         c (a wrong, b right), mcnemar {method, statistic, p_value}, missing {only_in_a, only_in_b,
         n_only_in_a, n_only_in_b}}.

    Raises:
        ValueError: malformed predictions, no shared item, or the same item with different gold labels.
    """
    _check_preds(preds_a, "preds_a")
    _check_preds(preds_b, "preds_b")
    by_a = {str(p["item_id"]): p for p in preds_a}
    by_b = {str(p["item_id"]): p for p in preds_b}
    shared = [i for i in by_a if i in by_b]
    only_a = [i for i in by_a if i not in by_b]
    only_b = [i for i in by_b if i not in by_a]
    if not shared:
        raise ValueError("the two runs share no item id: compare runs over the same evaluation items")
    known = set(label_names) if label_names is not None else None
    ok_a = np.empty(len(shared), dtype=bool)
    ok_b = np.empty(len(shared), dtype=bool)
    for j, i in enumerate(shared):
        pa, pb = by_a[i], by_b[i]
        if pa["gold"] != pb["gold"]:
            raise ValueError(f"item {i!r} has gold {pa['gold']!r} in one run and {pb['gold']!r} in the other: "
                             f"the runs are not over the same labeled items")
        kn = known if known is not None else {pa["gold"]}
        ok_a[j], ok_b[j] = _is_correct(pa, kn), _is_correct(pb, kn)
    b = int((ok_a & ~ok_b).sum())
    c = int((~ok_a & ok_b).sum())
    diff = float(ok_b.mean() - ok_a.mean())
    ci = None
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        d = ok_b.astype(np.float64) - ok_a.astype(np.float64)  # (n,) per-item paired difference
        idx = rng.integers(0, len(d), size=(bootstrap, len(d)))
        ci = percentile_ci(d[idx].mean(axis=1))
    return {
        "n_paired": len(shared),
        "accuracy_a": float(ok_a.mean()),
        "accuracy_b": float(ok_b.mean()),
        "difference": {"value": diff, "ci": ci, "method": "paired bootstrap", "n_boot": bootstrap},
        "b": b,
        "c": c,
        "mcnemar": mcnemar_test(b, c),
        "missing": {"only_in_a": only_a[:MAX_LISTED_IDS], "only_in_b": only_b[:MAX_LISTED_IDS],
                    "n_only_in_a": len(only_a), "n_only_in_b": len(only_b)},
    }

