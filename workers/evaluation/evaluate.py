"""The whole evaluation: per-model metrics (`metrics`), paired comparisons against the base, judge
summaries (`workers.judge`), the classical baseline (`baseline`), and what could not be computed.

`evaluate_runs` builds the evaluation document (plain JSON); `run_evaluation` is the evaluate job, which
checks it against its contract (`EvaluationDoc`) and writes the report.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from core.atomic import atomic_dir
from core.contracts.evaluation import EvaluationDoc
from core.contracts.judge import JudgeSummary
from core.contracts.metrics import read_metrics
from core.specs.evaluate import EvaluateSpec
from workers.evaluation.baseline import BaselineCorpus, BaselineUnavailable, baseline_predictions, load_corpus
from workers.evaluation.metrics import Pred, compare_models, compute_metrics
from workers.judge import compare_judgements, not_evidence_reason, summarize_judgements


# --------------------------------------------------------------------------------------------------
# The classical baseline


def _baseline_block(corpus: BaselineCorpus | None, runs: Mapping[str, Sequence[Pred]], label_names: Sequence[str],
                    base: str, bootstrap: int, seed: int, missing: list[str]) -> dict[str, Any] | None:
    """TF-IDF + linear SVM (`baseline`) fitted on the train split and scored on the base run's items:
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
                 seed: int) -> tuple[dict[str, JudgeSummary], dict[str, Any]]:
    """(summary per model, paired change of every other model against the base, or the first judged)."""
    if not rows_by_model:
        return {}, {}
    summaries = {name: summarize_judgements(rows, bootstrap=bootstrap, seed=seed)
                 for name, rows in rows_by_model.items()}
    ref = base if base in rows_by_model else next(iter(rows_by_model))
    cmps = {name: compare_judgements(rows_by_model[ref], rows, bootstrap=bootstrap, seed=seed)
            for name, rows in rows_by_model.items() if name != ref}
    return summaries, cmps


def _judge_validity(judge_summary: Mapping[str, JudgeSummary], dialogue_summary: Mapping[str, JudgeSummary],
                    missing: list[str]) -> dict[str, Any] | None:
    """Each judge run's control-set result, and the runs whose scores are not evidence (flagged in `missing`)."""
    if not judge_summary and not dialogue_summary:
        return None
    out: dict[str, Any] = {"judge": {}, "dialogue": {}, "not_evidence": []}
    for block, summaries in (("judge", judge_summary), ("dialogue", dialogue_summary)):
        for name, summ in summaries.items():
            out[block][name] = summ.validity.model_dump(mode="json") if summ.validity else None
            if not summ.evidence:
                what = "judge" if block == "judge" else "general-instruction judge"
                out["not_evidence"].append(f"{block}:{name}")
                missing.append(f"{name}: the {what} {not_evidence_reason(summ.validity)}: its scores are not evidence")
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
        comparisons {name: compare_models(base, name)}, generate_comparisons, judge {name: JudgeSummary as
        JSON}, judge_comparisons {name: paired judge-score change vs the base}, dialogue and
        dialogue_comparisons (the same for the general-instruction set), judge_validity {judge {name: control
        result}, dialogue {...}, not_evidence [block:name of each judge run that did not beat chance]} | None,
        baseline {name, method, fit_s, ..., metrics, comparisons {name: compare_models(baseline, name)}} | None,
        missing [what could not be computed and why], spec}.

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
        if summ.n_unscored:
            missing.append(f"{name}: the judge could not score {summ.n_unscored} of {summ.n} responses")
    if judge:
        missing += [f"{name}: not judged" for name in names if name not in judge]
    else:
        missing.append("no judge results: no coherence or instruction-following scores")
    dialogue_summary, dialogue_cmp = _judge_block(dialogue, base, bootstrap, seed)
    for name, summ in dialogue_summary.items():
        if summ.n_unscored:
            missing.append(f"{name}: the judge could not score {summ.n_unscored} of {summ.n} "
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
        "judge": {name: summ.model_dump(mode="json") for name, summ in judge_summary.items()},
        "judge_comparisons": judge_cmp,
        "dialogue": {name: summ.model_dump(mode="json") for name, summ in dialogue_summary.items()},
        "dialogue_comparisons": dialogue_cmp,
        "judge_validity": judge_validity,
        "baseline": baseline_doc,
        "missing": missing,
        "spec": spec_dump,
    }


# --------------------------------------------------------------------------------------------------
# The evaluate job


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

    Args:
        report_dir: the job's own report folder (spec.report): written beside it and renamed into place,
            replacing a leftover, so a crash or a full disk leaves no half-written report.

    Returns:
        (the evaluation document, checked against its contract; the report's path or None).

    Raises:
        ValueError: no runs, or no label names.
        core.atomic.DiskFull: the disk filled up while the report was written (nothing was kept).
    """
    from workers.evaluation.report import write_report  # lazy: matplotlib, only when a report is asked for

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
        with atomic_dir(Path(report_dir)) as tmp:  # the report folder appears whole or not at all (a full disk)
            written = write_report(evaluation.model_dump(mode="json"), tmp, loss_history=history or None)
        report_path = str(Path(report_dir) / written.name)
        ctx.event(f"report written: {report_path}")
    return evaluation, report_path
