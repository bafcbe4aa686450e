"""Check an export by reloading it the way its users will and classifying a fixed sample with it.

The reference is newslora's own adapter path (the base model + the LoRA adapter through the inference
engine, as classify jobs run it); the export must give the same label on nearly every article. An fp32
reference where the device has fast bf16 is computed in two passes: bf16 on every article, fp32 again on
those whose two best labels are close enough for bf16's rounding to have swapped them (`_reference_labels`).
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from core.context import JobContext, LocalContext
from core.specs.classify import ClassifySpec
from workers.inference.classify import AdapterRef, InferenceEngine, classify_items, get_engine
from workers.export.llamacpp import LlamaCppClassifier, llamacpp_version
from workers.modeling.registry import convert_gguf, pick_device, pick_dtype


@dataclass
class Verification:
    """What the check measured on `n` articles of the dataset's test split (score mode)."""

    n: int
    agreement: float  # share of articles where the export's label equals the adapter path's
    min_agreement: float
    passed: bool
    export_accuracy: float | None
    adapter_accuracy: float | None
    disagreements: list[dict[str, Any]]  # the first few: item id, adapter label, export label
    reloaded_with: str
    dtype: str
    seconds: float  # the whole check: the adapter path's labels, then the export's
    reference_seconds: float  # the adapter path's labels (~0 where this process had them from an earlier export)
    export_seconds: float  # the export reloaded and classifying the articles (loading included)
    reference: str = ""  # how the adapter path's labels were computed (see `_reference_labels`)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        acc = (f"; accuracy {self.export_accuracy:.2%} (adapter {self.adapter_accuracy:.2%})"
               if self.export_accuracy is not None and self.adapter_accuracy is not None else "")
        return (f"labels equal to the adapter's on {self.agreement:.2%} of {self.n} articles "
                f"(needs {self.min_agreement:.0%}){acc}")


class _Collected(LocalContext):
    """Predictions kept in memory (never in the export job's own prediction rows); events, progress and
    cancel go to the job's context."""

    def __init__(self, ctx: JobContext, what: str):
        super().__init__(work_dir=Path(ctx.work_dir), job_id=ctx.job_id)
        self._ctx, self._what = ctx, what

    def event(self, message: str, *, level: str = "info", metrics: dict[str, Any] | None = None) -> None:
        self._ctx.event(f"verify ({self._what}): {message}", level=level, metrics=metrics)

    def progress(self, done: float, total: float | None = None, *, message: str | None = None, **metrics: Any) -> None:
        self._ctx.progress(done, total, message=f"verify ({self._what}): {message or 'classified'}", **metrics)

    def check_cancel(self) -> None:
        self._ctx.check_cancel()


def _classify(engine: InferenceEngine, items: list[dict], *, adapter: AdapterRef | None, model_ref: str,
              label_names: list[str], instruction: str, template: str, spec: ClassifySpec, ctx: JobContext,
              what: str, margins: dict[str, float] | None = None) -> tuple[dict[str, str | None], dict[str, Any]]:
    """item id -> label, and classify_items' summary; with `margins`, also fills it: item id -> the log-likelihood
    gap between its two best labels (nats)."""
    collected = _Collected(ctx, what)
    summary = classify_items(items, engine=engine, model_ref=model_ref, adapter=adapter, label_names=label_names,
                             instruction=instruction, template=template, spec=spec, ctx=collected)
    if margins is not None:
        for iid, r in collected.predictions.items():
            top = sorted((r.get("probs") or {}).values(), reverse=True)
            margins[iid] = math.log(top[0] / top[1]) if len(top) > 1 and top[1] > 0 else math.inf
    return {iid: r["label"] for iid, r in collected.predictions.items()}, summary


# The adapter path's labels for the last sample checked (per process), keyed by everything they depend on.
_REFERENCE: dict[tuple, tuple[dict[str, str | None], dict[str, Any], str]] = {}


def _reference_key(adapter: AdapterRef, base_model: str, items: list[dict], label_names: list[str],
                   instruction: str, template: str, dtype: str, device: str) -> tuple:
    weights = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in Path(adapter.path).iterdir()
                     if f.is_file())
    sample = hashlib.sha256(json.dumps([[it["id"], it["text"]] for it in items]).encode()).hexdigest()
    return (str(adapter.path), tuple(weights), base_model, sample, tuple(label_names), instruction, template,
            dtype, device)


# fp32 references are computed in two passes where the CPU has fast bf16: every article in bf16 (the classify
# jobs' own dtype, ~3x the fp32 pass), then again in fp32 each article whose two best labels are closer than
# this (nats of log-likelihood). bf16 rounding moved SmolLM2's label log-likelihoods by at most 0.41 (base) and
# 0.44 (the quick preset's adapter) nats against fp32 on 400 AG News articles, so the gap between two labels moved
# by at most 0.88, and the labels it flipped had gaps under 0.13. With the adapter, 39-45 of 400 are rechecked.
FP32_RECHECK_MARGIN = 1.0


def _reference_labels(items: list[dict], *, adapter: AdapterRef, base_model: str, label_names: list[str],
                      instruction: str, template: str, spec: ClassifySpec,
                      ctx: JobContext) -> tuple[dict[str, str | None], dict[str, Any], str]:
    """The adapter path's labels on `items` in `spec.dtype` (computed once per sample and adapter in this
    process), its summary, and how they were computed.

    An fp32 reference on a CPU with fast bf16 takes two passes (FP32_RECHECK_MARGIN): the labels are fp32's
    wherever bf16 could have changed one, at about a third of the time of an fp32 pass over every article.
    """
    key = _reference_key(adapter, base_model, items, label_names, instruction, template, spec.dtype, spec.device)
    if key in _REFERENCE:  # exporting one adapter in several formats: its own labels are computed once
        ctx.event(f"verify (adapter): reusing the adapter's labels on these {len(items)} articles")
        return _REFERENCE[key]
    common = dict(adapter=adapter, model_ref=base_model, label_names=label_names, instruction=instruction,
                  template=template, ctx=ctx)
    fast = pick_dtype("auto", pick_device(spec.device))
    if spec.dtype == "fp32" and fast == torch.bfloat16:
        margins: dict[str, float] = {}
        # dtype "auto" (bf16 here): the engine classify jobs on this worker use, already loaded where they ran
        labels, _ = _classify(get_engine(base_model, dtype="auto", device=spec.device), items,
                              spec=spec.model_copy(update={"dtype": "auto"}), what="adapter, bf16", margins=margins,
                              **common)
        close = [it for it in items if margins.get(str(it["id"]), 0.0) < FP32_RECHECK_MARGIN]
        if close:
            rechecked, _ = _classify(get_engine(base_model, dtype="fp32", device=spec.device), close, spec=spec,
                                     what="adapter, fp32", **common)
            labels.update(rechecked)
        how = (f"fp32 where bf16 could differ: bf16 on all {len(items)}, fp32 again on the {len(close)} whose two "
               f"best labels were within {FP32_RECHECK_MARGIN:g} nats")
        ref = (labels, {"accuracy": _accuracy(items, labels)}, how)
    else:
        labels, summary = _classify(get_engine(base_model, dtype=spec.dtype, device=spec.device), items, spec=spec,
                                    what="adapter", **common)
        ref = (labels, summary, f"{spec.dtype} on all {len(items)}")
    _REFERENCE.clear()
    _REFERENCE[key] = ref
    return ref


def _accuracy(items: list[dict], labels: dict[str, str | None]) -> float | None:
    gold = [(str(it["id"]), it.get("label")) for it in items if it.get("label") is not None]
    return sum(labels.get(i) == g for i, g in gold) / len(gold) if gold else None


def _verification(ref: dict[str, str | None], got: dict[str, str | None], *, export_accuracy: float | None,
                  adapter_accuracy: float | None, min_agreement: float, reloaded_with: str, dtype: str,
                  start: float, reference_done: float, reference: str) -> Verification:
    ids = [iid for iid in ref if ref[iid] is not None]
    same = [iid for iid in ids if got.get(iid) == ref[iid]]
    agreement = len(same) / len(ids) if ids else 0.0
    diffs = [{"item_id": iid, "adapter": ref[iid], "export": got.get(iid)} for iid in ids if got.get(iid) != ref[iid]]
    end = time.perf_counter()  # one clock reading: the reference's and the export's seconds add up to the whole
    return Verification(n=len(ids), agreement=round(agreement, 4), min_agreement=min_agreement,
                        passed=bool(ids) and agreement >= min_agreement, export_accuracy=export_accuracy,
                        adapter_accuracy=adapter_accuracy, disagreements=diffs[:10], reloaded_with=reloaded_with,
                        dtype=dtype, seconds=round(end - start, 1), reference_seconds=round(reference_done - start, 1),
                        export_seconds=round(end - reference_done, 1), reference=reference)


def compare_to_adapter(export_model_dir: Path, items: list[dict], *, adapter: AdapterRef, base_model: str,
                       label_names: list[str], instruction: str, template: str, min_agreement: float,
                       reloaded_with: str, dtype: str, device: str, batch_size: int,
                       ctx: JobContext) -> Verification:
    """Classify `items` with the adapter path and with the checkpoint at `export_model_dir`; compare.

    Args:
        export_model_dir: a Hugging Face checkpoint folder loaded with transformers alone (the merged
            export itself, or what transformers' `gguf_file=` loader read from a GGUF export).
        items: the fixed sample ({"id", "text", "label"}).
    """
    start = time.perf_counter()
    # classify_items takes its mode and batching from the spec; the items are passed to it directly.
    spec = ClassifySpec(dataset_id=1, mode="score", batch_size=batch_size, dtype=dtype, device=device)
    ref, ref_summary, how_ref = _reference_labels(items, adapter=adapter, base_model=base_model,
                                                  label_names=label_names, instruction=instruction,
                                                  template=template, spec=spec, ctx=ctx)
    reference_done = time.perf_counter()
    engine = InferenceEngine(str(export_model_dir), dtype=dtype, device=device)  # not cached: used once
    try:
        got, got_summary = _classify(engine, items, adapter=None, model_ref=str(export_model_dir),
                                     label_names=label_names, instruction=instruction, template=template, spec=spec,
                                     ctx=ctx, what=reloaded_with)
    finally:
        del engine
    return _verification(ref, got, export_accuracy=got_summary.get("accuracy"),
                         adapter_accuracy=ref_summary.get("accuracy"), min_agreement=min_agreement,
                         reloaded_with=reloaded_with, dtype=dtype, start=start, reference_done=reference_done,
                         reference=how_ref)


def compare_gguf_in_llamacpp(gguf_path: Path, tokenizer_ref: Path, items: list[dict], *, adapter: AdapterRef,
                             base_model: str, label_names: list[str], instruction: str, template: str,
                             min_agreement: float, quant: str, dtype: str, device: str, batch_size: int,
                             threads: int | None, ctx: JobContext) -> Verification:
    """Classify `items` with the adapter path and with the GGUF file in llama.cpp itself; compare.

    The GGUF runs as its users run it (llama.cpp, through llama-cpp-python), with newslora's token ids,
    the shared prefix's KV cache reused and the label read from the logits (workers/export/llamacpp.py).
    """
    start = time.perf_counter()
    spec = ClassifySpec(dataset_id=1, mode="score", batch_size=batch_size, dtype=dtype, device=device)
    ref, ref_summary, how_ref = _reference_labels(items, adapter=adapter, base_model=base_model,
                                                  label_names=label_names, instruction=instruction,
                                                  template=template, spec=spec, ctx=ctx)
    reference_done = time.perf_counter()
    ctx.event(f"verify (llama.cpp): loading {gguf_path.name}")
    clf = LlamaCppClassifier(gguf_path, tokenizer_ref, template=template, instruction=instruction,
                             label_names=label_names, threads=threads)
    try:
        got: dict[str, str | None] = {}
        step = max(1, len(items) // 10)
        for i in range(0, len(items), step):
            ctx.check_cancel()
            got.update(clf.classify(items[i:i + step]))
            ctx.progress(len(got), len(items), message="verify (llama.cpp): classified")
        how = f"llama.cpp (llama-cpp-python {llamacpp_version()}, {quant}, {clf.mode}, {clf.threads_used()})"
    finally:
        clf.close()
    return _verification(ref, got, export_accuracy=_accuracy(items, got), adapter_accuracy=ref_summary.get("accuracy"),
                         min_agreement=min_agreement, reloaded_with=how, dtype=f"gguf {quant}", start=start,
                         reference_done=reference_done, reference=how_ref)


def reload_gguf_as_checkpoint(gguf_dir: Path, gguf_name: str, target: Path) -> Path:
    """What a transformers user gets from `from_pretrained(gguf_dir, gguf_file=gguf_name)`, saved as a plain
    checkpoint folder (tokenizer included) so the inference engine can load it."""
    if target.exists():
        shutil.rmtree(target)
    return convert_gguf(gguf_dir, gguf_name, target)
