"""Classification throughput, one run, same articles: the reference method (fp32 and bf16) vs newslora score mode
(base model and a LoRA adapter).

    python bench/infer_throughput.py                       # ~2 minutes on an idle 2-core machine
    python bench/infer_throughput.py --n 192 --n-reference 24
    python bench/infer_throughput.py --adapter ~/.newslora/adapters/job-3   # a trained adapter instead of a random one

(a) reference_fp32: the reference project's method exactly as it ran: Alpaca prompt, HF `generate` (greedy,
    30 new tokens, repetition penalty 1.2), batch 8, fp32, the first label name found in the text.
(b) reference_bf16: the same method with the model in bf16 (so the speed-up is not only a dtype change).
(c) newslora_base: score mode (`workers.inference.classify.classify_items`, as a classify job runs it: tokenization,
    length-sorted batches, shared-prefix KV cache, label log-likelihoods), dtype auto (bf16 with AMX/AVX512-BF16).
(d) newslora_adapter: the same with a LoRA adapter of the presets' shape (rank 16, alpha 32, all seven linear
    layers of configs/agnews-smollm2*.yaml; random weights unless --adapter), served merged.
Against the machine: the FLOPs score mode executed (counted from the batches it actually ran, the way
bench/train_throughput.py counts a training step's: `bench/flops.py`, forward only, padding excluded, the
cached prompt prefix not re-run), a second, as a fraction of the bf16 matmul peak measured in the same run
(the best of before, after each round, and after: `fraction_of_bf16_peak`, and per round against that
round's own peak: `per_round`).
The methods run in interleaved rounds (each round: a slice of the reference articles through (a) and (b), a
slice of all articles through (c) and (d)), so that other work on a shared CPU slows them alike; the ratios
are within one run. Model loading is not timed. The load average is printed before and after: quote a run as
a headline only when both are near zero. Prints JSON.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.flops import FlopModel, Work, matmul_gflops, score_batch_work  # noqa: E402
from core.settings import get_settings  # noqa: E402

AG_NEWS = get_settings().shared_data / "ag_news"
LABELS = ["World", "Sports", "Business", "Sci/Tech"]
PRESET_LORA = {"rank": 16, "alpha": 32,
               "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def read_ag_news_test(path: Path, n: int) -> list[dict]:
    """The first n rows of the original AG News test CSV (class 1-4, title, description; '\\' is a line break)."""
    out = []
    with path.open(encoding="utf-8", newline="") as f:
        for i, (cls, title, desc) in enumerate(csv.reader(f)):
            if i >= n:
                break
            text = f"{title} {desc}".replace("\\", " ").strip()
            out.append({"id": f"test-{i}", "text": text, "label": LABELS[int(cls) - 1]})
    return out


def load_reference(model_dir: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval(), tok


def reference_method(model, tok, items: list[dict], *, batch_size: int = 8) -> dict:
    """The reference project's inference: generate 30 tokens per article and look for a label in the text."""
    from workers.modeling.prompts import default_instruction, render_prompt
    instruction = default_instruction(LABELS)
    correct = 0
    t0 = time.perf_counter()
    for b in range(0, len(items), batch_size):
        batch = items[b:b + batch_size]
        enc = tok([render_prompt(instruction, it["text"]) for it in batch], return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=30, repetition_penalty=1.2, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        for it, text in zip(batch, tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)):
            hits = [(m.start(), name) for name in LABELS
                    for m in [re.search(re.escape(name), text, flags=re.IGNORECASE)] if m]
            correct += bool(hits) and min(hits)[1] == it["label"]
    return {"n": len(items), "seconds": time.perf_counter() - t0, "correct": correct}


@contextmanager
def counting_score_work() -> Iterator[Work]:
    """Within the block, the work of every score-mode forward that classification runs, as it runs it: each
    call of `score_labels` from workers/inference/classify.py is counted (its rows' lengths, the prefix,
    the label branches) and then made unchanged."""
    import workers.inference.classify as classify
    run = classify.score_labels
    work = Work()

    def counted(model, codec, seqs, prefix_kv, **kw):
        nonlocal work
        work += score_batch_work([len(s) for s in seqs], len(codec.prefix_ids) if prefix_kv is not None else 0,
                                 (codec.eos_plan if kw.get("with_eos") else codec.plan).branches)
        return run(model, codec, seqs, prefix_kv, **kw)

    classify.score_labels = counted
    try:
        yield work
    finally:
        classify.score_labels = run


def newslora_score(engine, items: list[dict], *, adapter, batch_size: int, label_names: list[str] = LABELS,
                   instruction: str | None = None, template: str = "alpaca") -> dict:
    """Score mode as a classify job runs it, and the work it executed (the prompt: the presets' default, or
    the one an adapter was trained with).

    Returns:
        {"n", "seconds", "correct", "work", "labels" (item id -> label)}.
    """
    from core.context import LocalContext
    from workers.inference.classify import classify_items
    from workers.modeling.prompts import default_instruction
    from core.specs.classify import ClassifySpec
    spec = ClassifySpec(items=items, batch_size=batch_size, mode="score")
    ctx = LocalContext()
    with counting_score_work() as work:
        t0 = time.perf_counter()
        summary = classify_items(items, engine=engine, model_ref=engine.model_ref, adapter=adapter,
                                 label_names=label_names, instruction=instruction or default_instruction(label_names),
                                 template=template, spec=spec, ctx=ctx)
        seconds = time.perf_counter() - t0
    return {"n": len(items), "seconds": seconds, "correct": round(summary["accuracy"] * len(items)), "work": work,
            "labels": {iid: r["label"] for iid, r in ctx.predictions.items()}}


def random_preset_adapter(model_dir: Path, out: Path, *, seed: int = 0, std: float = 0.02) -> Path:
    """A LoRA adapter of the presets' shape with random (non-zero) weights, and its newslora.json."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from core.contracts.adapter import AdapterMeta
    from workers.modeling.prompts import default_instruction
    from workers.modeling.registry import model_digest
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=PRESET_LORA["rank"], lora_alpha=PRESET_LORA["alpha"],
                                            target_modules=PRESET_LORA["target_modules"], init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, std)
    model.save_pretrained(out)
    AdapterMeta(template="alpaca", instruction=default_instruction(LABELS), label_names=LABELS,
                base_model=str(model_dir), base_model_digest=model_digest(model_dir)).save(out)
    return out


def _total(parts: list[dict], fm: FlopModel, peak_gflops: float) -> dict:
    n, seconds, correct = (sum(p[k] for p in parts) for k in ("n", "seconds", "correct"))
    out = {"n": n, "seconds": round(seconds, 2), "items_per_s": round(n / seconds, 3),
           "accuracy": round(correct / n, 4)}
    if "work" in parts[0]:  # newslora's score mode: the work it executed, against the machine's peak
        work = Work()
        for p in parts:
            work += p["work"]
        gflops = fm.flops(work) / seconds / 1e9
        out |= {"executed_tokens": work.executed_tokens, "padded_tokens": work.padded_tokens,
                "padding_share": round(1 - work.executed_tokens / work.padded_tokens, 3),
                "gflop_per_item": round(fm.flops(work) / n / 1e9, 2),
                "executed_gflops_per_s": round(gflops, 1), "fraction_of_bf16_peak": round(gflops / peak_gflops, 3)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400, help="articles for score mode (first N of test.csv)")
    ap.add_argument("--n-reference", type=int, default=48,
                    help="articles for the slow reference method (the first of the N); its items/s is a rate, so "
                         "a smaller sample only widens its error bar")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: n_reference / 16)")
    ap.add_argument("--batch-size", type=int, default=32, help="newslora score-mode batch size")
    ap.add_argument("--dtype", default="auto", help="newslora dtype (auto = bf16 where the CPU has it)")
    ap.add_argument("--adapter", type=Path, default=None, help="a trained adapter folder (default: a random one "
                                                               "of the presets' shape)")
    ap.add_argument("--model-dir", type=Path, default=None, help="SmolLM2 checkpoint folder (default: the preset)")
    args = ap.parse_args()
    load_before = os.getloadavg()
    peak_before = matmul_gflops(torch.bfloat16)
    from workers.inference.classify import AdapterRef, get_engine
    from workers.modeling.registry import resolve_model
    model_dir = args.model_dir or resolve_model("smollm2-135m")
    items = read_ag_news_test(AG_NEWS / "test.csv", args.n)
    n_ref = min(args.n_reference, len(items))
    engine = get_engine(str(model_dir), dtype=args.dtype)
    refs = {"reference_fp32": load_reference(model_dir, torch.float32),
            "reference_bf16": load_reference(model_dir, torch.bfloat16)}
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir = args.adapter or random_preset_adapter(model_dir, Path(tmp) / "adapter")
        adapter = AdapterRef(1, Path(adapter_dir))
        newslora_score(engine, items[:8], adapter=adapter, batch_size=args.batch_size)  # merge + prefix KV, untimed
        newslora_score(engine, items[:8], adapter=None, batch_size=args.batch_size)
        rounds = args.rounds or max(1, math.ceil(n_ref / 16))
        parts: dict[str, list[dict]] = {k: [] for k in ("reference_fp32", "reference_bf16", "newslora_base",
                                                        "newslora_adapter")}
        round_peaks: list[float] = []  # the bf16 peak measured right after each round's classification
        for r in range(rounds):
            lo, hi = r * len(items) // rounds, (r + 1) * len(items) // rounds
            rlo, rhi = r * n_ref // rounds, (r + 1) * n_ref // rounds
            for name, (model, tok) in refs.items():
                if rhi > rlo:
                    parts[name].append(reference_method(model, tok, items[rlo:rhi]))
            runs = [("newslora_base", None), ("newslora_adapter", adapter)]
            for name, which in runs[::1 if r % 2 == 0 else -1]:  # alternate which goes first
                parts[name].append(newslora_score(engine, items[lo:hi], adapter=which, batch_size=args.batch_size))
            round_peaks.append(matmul_gflops(torch.bfloat16, reps=6))
    peak_after = matmul_gflops(torch.bfloat16)
    peak = max([peak_before, peak_after] + round_peaks)  # a peak: the best measurement of the run
    fm = FlopModel.forward_only(model_dir)
    out = {name: _total(p, fm, peak) for name, p in parts.items()}
    rate = {name: o["items_per_s"] for name, o in out.items()}
    print(json.dumps({
        "model": "SmolLM2-135M-Instruct", "n": len(items), "n_reference": n_ref, "rounds": rounds,
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
        "newslora_dtype": str(engine.torch_dtype).replace("torch.", ""), "batch_size": args.batch_size,
        "adapter": str(args.adapter) if args.adapter else "random, presets' shape " + json.dumps(PRESET_LORA),
        "load_avg_before": [round(x, 2) for x in load_before], "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "bf16_matmul_peak_gflops": {"best": round(peak, 1), "before": round(peak_before, 1),
                                    "after": round(peak_after, 1), "rounds": [round(x, 1) for x in round_peaks]},
        "flop_model": asdict(fm),
        **out,
        # per round: the adapter's executed GFLOP/s against the peak measured right after that round (the
        # fairer fraction where the machine's matmul rate itself moves)
        "per_round_adapter": [{"executed_gflops_per_s": round(g := fm.flops(p["work"]) / p["seconds"] / 1e9, 1),
                               "bf16_peak_gflops": round(pk, 1), "fraction_of_round_peak": round(g / pk, 3)}
                              for p, pk in zip(parts["newslora_adapter"], round_peaks)],
        "adapter_vs_base": round(rate["newslora_adapter"] / rate["newslora_base"], 3),
        "speedup_vs_reference_fp32": {k: round(rate[k] / rate["reference_fp32"], 2)
                                      for k in ("newslora_base", "newslora_adapter")},
        "speedup_vs_reference_bf16": {k: round(rate[k] / rate["reference_bf16"], 2)
                                      for k in ("newslora_base", "newslora_adapter")},
        "reference_bf16_vs_fp32": round(rate["reference_bf16"] / rate["reference_fp32"], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
