"""Evaluation metrics: pure functions over per-item predictions, with honest uncertainty.

A prediction is one dict per item, as the classify job stores it:

    {"item_id": str, "label": str | None, "gold": str, "probs": {label: p} | None,
     "follows_instruction": bool | None, "error": str | None}

`label` None means the model gave no usable answer (a failed item): it counts as wrong and is reported
as failed, never dropped. Gold labels outside `label_names` (classes the model was never trained on)
are reported and count as wrong too.

Everything returned is plain JSON (floats, ints, strings, lists, dicts, None) so it can be stored on a
job row and rendered by `workers.evaluation.report` without this module.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from core.contracts.evaluation import EvaluationDoc
from core.stats import expected_calibration_error, mcnemar_test, percentile_ci, wilson_interval
from workers.evaluation.baseline import BaselineCorpus, BaselineUnavailable, baseline_predictions
from core.specs.evaluate import EvaluateSpec

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


# --------------------------------------------------------------------------------------------------
# The classical baseline


def _baseline_block(corpus: BaselineCorpus | None, runs: Mapping[str, Sequence[Pred]], label_names: Sequence[str], base: str,
                    bootstrap: int, seed: int, missing: list[str]) -> dict[str, Any] | None:
    """TF-IDF + linear SVM (`workers.evaluation.baseline`) fitted on the train split and scored on the base run's items:
    {name, method, source, n_train, n_features, fit_s, predict_s, n_items, n_not_found, metrics,
    comparisons {model: compare_models(baseline, model)}}, or None (with the reason in `missing`)."""
    if corpus is None:
        missing.append("no classical baseline: the classify jobs did not read a prepared dataset with a train split")
        return None
    try:
        preds, info = baseline_predictions(corpus, [str(p["item_id"]) for p in runs[base]])
    except BaselineUnavailable as e:
        missing.append(f"no classical baseline: {e}")
        return None
    if info["n_not_found"]:
        missing.append(f"{info['name']}: {info['n_not_found']} evaluated items are not in {info['source']}; "
                       f"scored on the other {info['n_items']}")
    # b: the baseline right and the model wrong; c: the reverse. difference: model - baseline.
    comparisons = {name: compare_models(preds, run, label_names=label_names, bootstrap=bootstrap, seed=seed)
                   for name, run in runs.items()}
    return {**info, "metrics": compute_metrics(preds, label_names, bootstrap=bootstrap, seed=seed),
            "comparisons": comparisons}


# --------------------------------------------------------------------------------------------------
# The whole evaluation


def _judge_block(rows_by_model: Mapping[str, Sequence[Mapping[str, Any]]] | None, base: str, bootstrap: int,
                 seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(summary per model, paired change of every other model against the base, or the first judged)."""
    from workers.judge import compare_judgements, summarize_judgements

    if not rows_by_model:
        return {}, {}
    summaries = {name: summarize_judgements(rows, bootstrap=bootstrap, seed=seed)
                 for name, rows in rows_by_model.items()}
    ref = base if base in rows_by_model else next(iter(rows_by_model))
    cmps = {name: compare_judgements(rows_by_model[ref], rows, bootstrap=bootstrap, seed=seed)
            for name, rows in rows_by_model.items() if name != ref}
    return summaries, cmps


def _judge_validity(judge_summary: Mapping[str, Mapping[str, Any]], dialogue_summary: Mapping[str, Mapping[str, Any]],
                    missing: list[str]) -> dict[str, Any] | None:
    """Each judge run's control-set result, and the runs whose scores are not evidence (flagged in `missing`)."""
    if not judge_summary and not dialogue_summary:
        return None
    out: dict[str, Any] = {"judge": {}, "dialogue": {}, "not_evidence": []}
    for block, summaries in (("judge", judge_summary), ("dialogue", dialogue_summary)):
        for name, summ in summaries.items():
            out[block][name] = summ.get("validity")
            if not summ.get("evidence"):
                what = "judge" if block == "judge" else "general-instruction judge"
                out["not_evidence"].append(f"{block}:{name}")
                v = summ.get("validity")
                why = "scored no control pairs" if not v or not v.get("n_pairs") else \
                    f"did not beat chance on its control set ({v['k_correct']} of {v['n_pairs']})"
                missing.append(f"{name}: the {what} {why}: its scores are not evidence")
    return out


def evaluate_runs(runs: Mapping[str, Sequence[Pred]], label_names: Sequence[str],
                  judge: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
                  spec: EvaluateSpec | None = None, *,
                  generate_runs: Mapping[str, Sequence[Pred]] | None = None,
                  dialogue: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
                  baseline: BaselineCorpus | None = None) -> dict[str, Any]:
    """The evaluation document: per-model metrics, paired comparisons against the base, judge summaries.

    Args:
        runs: model name -> score-mode predictions; the first entry is the base every other is compared to.
        label_names: the trained labels.
        judge: model name -> judge rows (from `workers.judge.judge_items`), or None.
        spec: the evaluate job's spec (bootstrap count, seed, name); None uses the defaults.
        generate_runs: model name -> generate-mode predictions (accuracy of free answers and instruction
            following), or None.
        dialogue: model name -> judge rows over the general-instruction set (workers/data/dialogue.jsonl).
        baseline: the train split and the evaluated items' texts (`workers.evaluation.baseline.load_corpus`): a TF-IDF +
            linear SVM is fitted on it and scored on the base run's items; None notes it as missing.

    Returns:
        JSON-ready {name, label_names, base, models {name: metrics}, generate {name: metrics},
        comparisons {name: compare_models(base, name)}, generate_comparisons, judge {name: summary},
        judge_comparisons {name: paired judge-score change vs the base}, dialogue and
        dialogue_comparisons (the same for the general-instruction set), judge_validity {judge {name: control
        result}, dialogue {...}, not_evidence [block:name of each judge run that did not beat chance]} | None, baseline {name, method, fit_s, ...,
        metrics, comparisons {name: compare_models(baseline, name)}} | None, missing [what could not be
        computed and why], spec}.

    Raises:
        ValueError: no runs, or malformed predictions (see compute_metrics).
    """
    if not runs:
        raise ValueError("no runs to evaluate: pass at least one model's predictions")
    spec_dump = spec.model_dump(mode="json") if spec is not None else None
    bootstrap, seed = (spec.bootstrap, spec.seed) if spec is not None else (1000, 0)
    names = list(runs)
    base = names[0]
    missing: list[str] = []
    models = {}
    for name in names:
        try:
            models[name] = compute_metrics(runs[name], label_names, bootstrap=bootstrap, seed=seed)
        except ValueError as e:
            raise ValueError(f"run {name!r}: {e}") from e
        if models[name]["calibration"]["n"] == 0:
            missing.append(f"{name}: no score probabilities, so no calibration error (run classify in score mode)")
        if models[name]["n_failed"]:
            missing.append(f"{name}: {models[name]['n_failed']} of {models[name]['n']} items had no answer "
                           f"(counted wrong)")
        if models[name]["unknown_labels"]["n_items"]:
            labs = ", ".join(models[name]["unknown_labels"]["labels"])
            missing.append(f"{name}: {models[name]['unknown_labels']['n_items']} items have gold labels the "
                           f"model was not trained on ({labs}); counted wrong")
    comparisons = {name: compare_models(runs[base], runs[name], label_names=label_names,
                                        bootstrap=bootstrap, seed=seed)
                   for name in names[1:]}
    for name, cmp in comparisons.items():
        if cmp["missing"]["n_only_in_a"] or cmp["missing"]["n_only_in_b"]:
            missing.append(f"{name} vs {base}: {cmp['missing']['n_only_in_a']} items only in {base}, "
                           f"{cmp['missing']['n_only_in_b']} only in {name}; compared on {cmp['n_paired']} shared")
    if len(names) < 2:
        missing.append("only one model: no paired comparison (add the base or fine-tuned run)")
    baseline_doc = _baseline_block(baseline, runs, label_names, base, bootstrap, seed, missing)

    generate, generate_cmp = {}, {}
    for name, preds in (generate_runs or {}).items():
        generate[name] = compute_metrics(preds, label_names, bootstrap=bootstrap, seed=seed)
        if generate[name]["instruction_following"] is None:
            missing.append(f"{name}: generate run has no instruction-following flags")
    gen_names = list(generate_runs or {})
    if gen_names:
        gbase = base if base in generate else gen_names[0]
        for name in gen_names:
            if name != gbase:
                generate_cmp[name] = compare_models(generate_runs[gbase], generate_runs[name],
                                                    label_names=label_names, bootstrap=bootstrap,
                                                    seed=seed)
    else:
        missing.append("no generate-mode runs: no instruction-following rate")

    judge_summary, judge_cmp = _judge_block(judge, base, bootstrap, seed)
    for name, summ in judge_summary.items():
        if summ["n_unscored"]:
            missing.append(f"{name}: the judge could not score {summ['n_unscored']} of {summ['n']} responses")
    if judge:
        missing += [f"{name}: not judged" for name in names if name not in judge]
    else:
        missing.append("no judge results: no coherence or instruction-following scores")
    dialogue_summary, dialogue_cmp = _judge_block(dialogue, base, bootstrap, seed)
    for name, summ in dialogue_summary.items():
        if summ["n_unscored"]:
            missing.append(f"{name}: the judge could not score {summ['n_unscored']} of {summ['n']} "
                           f"general-instruction answers")
    judge_validity = _judge_validity(judge_summary, dialogue_summary, missing)

    return {
        "name": spec.name if spec is not None else None,
        "label_names": list(label_names),
        "base": base,
        "models": models,
        "comparisons": comparisons,
        "generate": generate,
        "generate_comparisons": generate_cmp,
        "judge": judge_summary,
        "judge_comparisons": judge_cmp,
        "dialogue": dialogue_summary,
        "dialogue_comparisons": dialogue_cmp,
        "judge_validity": judge_validity,
        "baseline": baseline_doc,
        "missing": missing,
        "spec": spec_dump,
    }


# --------------------------------------------------------------------------------------------------
# The evaluate job
# --------------------------------------------------------------------------------------------------

@dataclass
class EvaluationInputs:
    """What an evaluate job reads from the store, by model name (the first run is the base)."""

    runs: dict[str, list[dict[str, Any]]]
    label_names: list[str]
    generate_runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    judged: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    dialogue: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    models_used: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None  # the fine-tuned adapter's training run (its metrics.jsonl)
    dataset_dir: Path | None = None  # the prepared dataset the runs scored (the classical baseline's data)
    split: str = "test"


def run_evaluation(spec: EvaluateSpec, inputs: EvaluationInputs, ctx: Any, *,
                   report_dir: Path) -> tuple[EvaluationDoc, str | None]:
    """The evaluate job: metrics, comparisons, judge summaries, the classical baseline, the report.

    Returns:
        (the evaluation document, checked against its contract; the report's path or None).

    Raises:
        ValueError: no runs, or no label names.
    """
    from core.contracts.metrics import read_metrics
    from workers.evaluation.baseline import load_corpus
    from workers.evaluation.report import write_report

    if not inputs.runs:
        raise ValueError("no classify jobs to evaluate")
    if not inputs.label_names:
        raise ValueError("the classify jobs recorded no label names")
    ctx.event(f"evaluating {', '.join(inputs.runs)} on {len(next(iter(inputs.runs.values())))} items")
    corpus = load_corpus(inputs.dataset_dir, inputs.split) if inputs.dataset_dir is not None else None
    doc = evaluate_runs(inputs.runs, inputs.label_names, inputs.judged or None, spec,
                        generate_runs=inputs.generate_runs or None, dialogue=inputs.dialogue or None,
                        baseline=corpus)
    doc["models_used"] = inputs.models_used
    history = [r.model_dump(exclude_none=True, exclude={"format_version"})
               for r in read_metrics(inputs.run_dir)] if inputs.run_dir is not None else []
    if history:
        doc["loss_history"] = history
    evaluation = EvaluationDoc.validated(doc, where="the evaluation document")
    report_path = None
    if spec.report:
        report_path = str(write_report(evaluation.model_dump(mode="json"), report_dir, loss_history=history or None))
        ctx.event(f"report written: {report_path}")
    return evaluation, report_path
