"""Batched classification: a job's items through the base model or an adapter, predictions stored per batch.

Plain functions; the job's handler (`workers/jobs/handlers.py`) looks up the dataset folder and adapter the spec
names and calls `run_classify(spec, ctx, dataset_dir=..., adapter=AdapterRef(7, path))`, which returns a
`ClassifyResult` over every stored item of the job (a resumed job included).
"""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from core.context import JobContext
from core.contracts.adapter import AdapterMeta
from core.contracts.dataset import DatasetMeta
from core.contracts.prediction import PredictionRow
from core.contracts.results import ClassifyResult
from core.specs.classify import ClassifySpec
from core.specs.prep import AG_NEWS_LABELS
from workers.inference.adapter import AdapterError, AdapterRef, read_adapter_meta
from workers.inference.batching import padded_batches
from workers.inference.engine import InferenceEngine, clear_engines, get_engine
from workers.inference.items import InputFileError, load_items, read_text_strict
from workers.modeling.codec import LabelTokensError, PromptCodec
from workers.modeling.generation import generate, parse_label
from workers.modeling.prompts import default_instruction
from workers.modeling.scoring import score_labels, softmax_probs

__all__ = ["run_classify", "classify_items", "load_items", "get_engine", "clear_engines", "InferenceEngine",
           "AdapterRef", "AdapterMeta", "AdapterError", "InputFileError", "LabelTokensError", "read_adapter_meta",
           "read_text_strict", "parse_label"]


def run_classify(spec: ClassifySpec, ctx: JobContext, *, dataset_dir: Path | None = None,
                 adapter: AdapterRef | None = None, shard: Callable[[int], None] | None = None) -> ClassifyResult:
    """A classify job: resolve the prompt, read the items, classify them, report over every stored item.

    The prompt (labels, instruction, template) comes from the spec where given, else from the adapter's
    newslora.json, else from the dataset's meta.json, else AG News's defaults - never re-typed.

    Args:
        dataset_dir: the prepared dataset folder the spec's dataset_id names (None without one).
        adapter: the adapter the spec's adapter_id names (None for the base model).
        shard: called with the number of valid items before any is classified; it may hand them to shard
            jobs instead (`workers.jobs.shards.split`, which then raises `ShardsPending`).

    Raises:
        InputFileError, AdapterError, ValueError: see `load_items` and `classify_items`.
    """
    sources = []
    if adapter is not None:
        sources.append(adapter.meta)  # read once: the engine's checks below use the same ref's meta
    if dataset_dir is not None:
        sources.append(DatasetMeta.load(dataset_dir))
    label_names = spec.label_names or next((m.label_names for m in sources if m.label_names), list(AG_NEWS_LABELS))
    instruction = spec.instruction or next((m.instruction for m in sources if m.instruction), None) \
        or default_instruction(label_names)
    template = spec.template or next((m.template for m in sources if m.template), "alpaca")
    items, rejected = load_items(spec, dataset_dir)
    if rejected and spec.shard is None:  # a shard's input is its parent's: the parent stored the rejected
        ctx.save_predictions([PredictionRow(item_id=r["id"], error=r["reason"], flags=["rejected"],
                                            seq=r.get("seq", 0), model=spec.model, adapter_id=spec.adapter_id)
                              for r in rejected])
        ctx.event(f"{len(rejected)} items rejected", level="warning",
                  metrics={"rejected": len(rejected), "examples": rejected[:5]})
    if shard is not None:
        shard(len(items))
    engine = get_engine(spec.model, dtype=spec.dtype, device=spec.device)
    summary = classify_items(items, engine=engine, model_ref=spec.model, adapter=adapter, label_names=label_names,
                             instruction=instruction, template=template, spec=spec, ctx=ctx)
    return ClassifyResult(**summary, rejected=0 if spec.shard else len(rejected), label_names=label_names,
                          template=template, instruction=instruction, dataset_id=spec.dataset_id,
                          adapter_id=spec.adapter_id, model=spec.model)


def classify_items(items: list[dict], *, engine: InferenceEngine, model_ref: str, adapter: AdapterRef | None,
                   label_names: list[str], instruction: str, template: str, spec: ClassifySpec,
                   ctx: JobContext) -> dict[str, Any]:
    """Classify items in length-bucketed batches, storing each batch's predictions as it finishes.

    Score mode (default) reads, for every label, the log-likelihood of its tokens after the prompt and
    picks the highest; `probs` is the softmax over those sequence log-likelihoods, i.e. a distribution
    over the labels only, normalised to sum to 1 (not the model's probability of emitting the label
    text). Generate mode generates a response and parses it with `parse_label` (exact-one-label rule).

    Items whose ids `ctx.done_item_ids()` already holds are skipped (a re-delivered job continues);
    `ctx.check_cancel()` runs before each batch, and what was stored stays stored.

    Args:
        items: dicts with `id`, `text`, optionally `label` (gold) and `seq` (input order).
        adapter: the LoRA adapter, or None for the base model. Its newslora.json must agree with
            `template` and `label_names` (the task reads them from there).
        spec: mode, batch size, generation settings, max_input_tokens.

    Returns:
        summary: counts, items_per_s, failed (item_id + error), truncated, accuracy where gold labels
        were given, following_rate in generate mode.

    Raises:
        ValueError: empty batch, unusable labels, or prompt settings that contradict the adapter's.
        AdapterError: adapter folder missing/malformed or trained for another base model.
        JobCancelled: from ctx.check_cancel().
    """
    if not items:
        raise ValueError("empty batch: there are no items to classify (check the input file, split or limit)")
    start = time.perf_counter()
    done_ids = ctx.done_item_ids()
    adapter_id = adapter.adapter_id if adapter is not None else None
    failed: list[dict[str, Any]] = []
    early_rows: list[PredictionRow] = []
    todo: list[dict[str, Any]] = []
    seen: set[str] = set()
    skipped = 0
    for n, it in enumerate(items):
        iid = str(it["id"])
        if iid in seen:
            failed.append({"item_id": iid, "seq": it.get("seq", n),
                           "error": "duplicate id in this batch: the first item with this id was kept"})
            continue
        seen.add(iid)
        if iid in done_ids:
            skipped += 1
            continue
        text = it.get("text")
        if not isinstance(text, str) or not text.strip():
            err = "empty text: nothing to classify"
            early_rows.append(_row(it, n, label=None, error=err, flags=["empty_text"], model=model_ref,
                                   adapter_id=adapter_id))
            failed.append({"item_id": iid, "seq": it.get("seq", n), "error": err})
            continue
        todo.append({**it, "id": iid, "text": text.strip(), "seq": it.get("seq", n)})
    if early_rows:
        ctx.save_predictions(early_rows)

    predicted: list[PredictionRow] = []
    with engine.use(adapter) as key:
        if adapter is not None:
            _check_adapter_prompt(engine.adapter_meta(adapter), adapter, template, label_names, instruction, ctx)
        codec = PromptCodec.build(engine.tokenizer, instruction=instruction, template=template,
                                  label_names=label_names)
        generating = spec.mode == "generate"
        if not generating:
            codec.check_scorable()
        budget = codec.article_budget(engine.max_positions,
                                      reserve=spec.max_new_tokens if generating else codec.branch_len + 1)
        if spec.max_input_tokens is not None:
            budget = min(budget, spec.max_input_tokens)
        encoded = codec.bodies([it["text"] for it in todo], max_article_tokens=budget) if todo else []
        prefix_kv = engine.prefix_kv(key, codec.prefix_ids) if todo and not generating else None
        # Length-sorted batches of at most batch_size: score mode's cut where padding would cost more than one more
        # batch; generate mode's in equal cuts (a batch there is a whole decode loop, and a sampled run's seed is
        # per batch, so its batches stay what they were)
        lengths = [len(e.ids) for e in encoded]
        if generating:
            order = sorted(range(len(todo)), key=lambda i: lengths[i])
            batches = [order[b0:b0 + spec.batch_size] for b0 in range(0, len(order), spec.batch_size)]
        else:
            batches = padded_batches(lengths, spec.batch_size)
        t_work = time.perf_counter()
        for idx in batches:
            ctx.check_cancel()
            seqs = [encoded[i].ids for i in idx]
            t0 = time.perf_counter()
            if generating:
                responses = generate(engine.model, engine.tokenizer, [codec.prefix_ids + s for s in seqs],
                                     max_new_tokens=spec.max_new_tokens, temperature=spec.temperature,
                                     top_p=spec.top_p, repetition_penalty=spec.repetition_penalty, seed=spec.seed)
            else:
                loglik = score_labels(engine.model, codec, seqs, prefix_kv)  # (batch, n_labels)
            latency = (time.perf_counter() - t0) * 1000 / len(idx)
            rows = []
            for j, i in enumerate(idx):
                it = todo[i]
                flags = ["truncated"] if encoded[i].truncated else []
                if generating:
                    label = parse_label(responses[j], label_names)
                    if label is None:
                        flags.append("no_single_label")
                    row = _row(it, i, label=label, response=responses[j], follows=label is not None, flags=flags,
                               latency_ms=latency, model=model_ref, adapter_id=adapter_id)
                else:
                    probs = softmax_probs(loglik[j], label_names)
                    row = _row(it, i, label=label_names[int(loglik[j].argmax())], probs=probs, flags=flags,
                               latency_ms=latency, model=model_ref, adapter_id=adapter_id)
                rows.append(row)
            ctx.save_predictions(rows)
            predicted.extend(rows)
            n_done = len(predicted)
            rate = n_done / max(time.perf_counter() - t_work, 1e-9)
            ctx.progress(n_done, len(todo), message="classified", items_per_s=round(rate, 3),
                         eta_s=round((len(todo) - n_done) / rate, 1))
    duplicates = [f for f in failed if f["error"].startswith("duplicate id")]
    return _summary(spec.mode, ctx.stored_predictions(), duplicates, skipped=skipped, attempt_rows=len(predicted),
                    total=len(items), seconds=time.perf_counter() - start, label_names=label_names)


def _check_adapter_prompt(meta: AdapterMeta, adapter: AdapterRef, template: str, label_names: list[str],
                          instruction: str, ctx: JobContext) -> None:
    """The prompt must be the one the adapter was trained with (read from its newslora.json, never re-typed)."""
    if meta.template != template:
        raise ValueError(f"adapter {adapter.adapter_id} was trained with template {meta.template!r}, not "
                         f"{template!r}: leave the template unset so it is read from the adapter")
    if meta.label_names and list(meta.label_names) != list(label_names):
        raise ValueError(f"adapter {adapter.adapter_id} was trained for labels {meta.label_names}, not "
                         f"{label_names}: leave label_names unset so they are read from the adapter")
    if meta.instruction and meta.instruction != instruction:
        ctx.event(f"instruction differs from the one adapter {adapter.adapter_id} was trained with",
                  level="warning", metrics={"trained": meta.instruction, "given": instruction})


def _row(it: dict, n: int, *, label: str | None, model: str, adapter_id: int | None, probs: dict | None = None,
         response: str | None = None, follows: bool | None = None, flags: list[str] | None = None,
         error: str | None = None, latency_ms: float | None = None) -> PredictionRow:
    return PredictionRow(item_id=str(it["id"]), seq=it.get("seq", n), label=label, probs=probs, response=response,
                         follows_instruction=follows, gold=it.get("label"),
                         latency_ms=None if latency_ms is None else round(latency_ms, 3), flags=flags or [],
                         error=error, model=model, adapter_id=adapter_id)


def _summary(mode: str, stored: list[PredictionRow], duplicates: list[dict], *, skipped: int, attempt_rows: int,
             total: int, seconds: float, label_names: list[str]) -> dict[str, Any]:
    """Counts and accuracy over every stored item of the job (all attempts), timings of this attempt."""
    stored = [r for r in stored if "rejected" not in r.flags]
    done = [r for r in stored if r.error is None]
    failed = [{"item_id": r.item_id, "seq": r.seq, "error": r.error} for r in stored if r.error is not None]
    failed += duplicates
    counts = Counter(r.label for r in done if r.label is not None)
    gold = [r for r in done if r.gold is not None]
    out: dict[str, Any] = {
        "mode": mode, "total": total, "classified": len(done), "skipped_done": skipped,
        "attempt_classified": attempt_rows, "n_failed": len(failed), "failed": failed,
        "truncated": sum("truncated" in r.flags for r in done),
        "counts": {name: counts.get(name, 0) for name in label_names},
        "seconds": round(seconds, 3), "items_per_s": round(attempt_rows / seconds, 3) if seconds > 0 else None,
    }
    if gold:
        out["n_gold"] = len(gold)
        out["accuracy"] = sum(r.label == r.gold for r in gold) / len(gold)
    if mode == "generate":
        out["following_rate"] = (sum(bool(r.follows_instruction) for r in done) / len(done)) if done else None
    return out
