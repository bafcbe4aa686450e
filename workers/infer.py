"""Batched classification: a job's items through the base model or an adapter, predictions stored per batch.

Plain functions; the Celery task (`workers/tasks.py`) resolves the spec and calls them:

    items, rejected = load_items(spec, dataset_dir)
    engine = get_engine(spec.model, dtype=spec.dtype, device=spec.device)
    summary = classify_items(items, engine=engine, model_ref=spec.model, adapter=AdapterRef(7, path),
                             label_names=[...], instruction="...", template="alpaca", spec=spec, ctx=ctx)
"""
from __future__ import annotations

import math
import time
from collections import Counter
from typing import Any

from workers.context import JobContext
from workers.inference.engine import (AdapterError, AdapterMeta, AdapterRef, InferenceEngine, clear_engines,
                                      get_engine, read_adapter_meta)
from workers.inference.items import InputFileError, load_items, read_text_strict
from workers.modeling.codec import LabelTokensError, PromptCodec
from workers.modeling.generation import generate, parse_label
from workers.modeling.scoring import score_labels, softmax_probs
from workers.specs.classify import ClassifySpec

__all__ = ["classify_items", "load_items", "get_engine", "clear_engines", "InferenceEngine", "AdapterRef",
           "AdapterMeta", "AdapterError", "InputFileError", "LabelTokensError", "read_adapter_meta",
           "read_text_strict", "parse_label"]


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
    early_rows: list[dict[str, Any]] = []
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

    truncated = 0
    predicted: list[dict[str, Any]] = []
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
        # Length buckets: sorted by token length, so a batch pads to nearly its own length.
        order = sorted(range(len(todo)), key=lambda i: len(encoded[i].ids))
        bs = spec.batch_size
        t_work = time.perf_counter()
        for b0 in range(0, len(order), bs):
            ctx.check_cancel()
            idx = order[b0:b0 + bs]
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
                truncated += encoded[i].truncated
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
    return _summary(spec.mode, predicted, failed, skipped=skipped, truncated=truncated, total=len(items),
                    seconds=time.perf_counter() - start, label_names=label_names)


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
         error: str | None = None, latency_ms: float | None = None) -> dict[str, Any]:
    return {"item_id": str(it["id"]), "seq": it.get("seq", n), "label": label, "probs": probs, "response": response,
            "follows_instruction": follows, "gold": it.get("label"),
            "latency_ms": None if latency_ms is None else round(latency_ms, 3), "flags": flags or [],
            "error": error, "model": model, "adapter_id": adapter_id}


def _summary(mode: str, rows: list[dict], failed: list[dict], *, skipped: int, truncated: int, total: int,
             seconds: float, label_names: list[str]) -> dict[str, Any]:
    counts = Counter(r["label"] for r in rows if r["label"] is not None)
    gold = [r for r in rows if r["gold"] is not None]
    out: dict[str, Any] = {
        "mode": mode, "total": total, "classified": len(rows), "skipped_done": skipped,
        "n_failed": len(failed), "failed": failed, "truncated": truncated,
        "counts": {name: counts.get(name, 0) for name in label_names},
        "seconds": round(seconds, 3), "items_per_s": round(len(rows) / seconds, 3) if seconds > 0 else math.nan,
    }
    if gold:
        out["n_gold"] = len(gold)
        out["accuracy"] = sum(r["label"] == r["gold"] for r in gold) / len(gold)
    if mode == "generate":
        out["following_rate"] = (sum(bool(r["follows_instruction"]) for r in rows) / len(rows)) if rows else None
    return out
