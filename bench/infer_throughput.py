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
import tempfile
import time
from pathlib import Path

import torch

from core.settings import get_settings

REPO = Path(__file__).resolve().parents[1]
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


def newslora_score(engine, items: list[dict], *, adapter, batch_size: int) -> dict:
    """Score mode as a classify job runs it (prompt from the adapter where given)."""
    from core.context import LocalContext
    from workers.inference.classify import classify_items
    from workers.modeling.prompts import default_instruction
    from core.specs.classify import ClassifySpec
    spec = ClassifySpec(items=items, batch_size=batch_size, mode="score")
    t0 = time.perf_counter()
    summary = classify_items(items, engine=engine, model_ref=engine.model_ref, adapter=adapter, label_names=LABELS,
                             instruction=default_instruction(LABELS), template="alpaca", spec=spec,
                             ctx=LocalContext())
    return {"n": len(items), "seconds": time.perf_counter() - t0, "correct": round(summary["accuracy"] * len(items))}


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


def _total(parts: list[dict]) -> dict:
    n, seconds, correct = (sum(p[k] for p in parts) for k in ("n", "seconds", "correct"))
    return {"n": n, "seconds": round(seconds, 2), "items_per_s": round(n / seconds, 3),
            "accuracy": round(correct / n, 4)}


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
        for r in range(rounds):
            lo, hi = r * len(items) // rounds, (r + 1) * len(items) // rounds
            rlo, rhi = r * n_ref // rounds, (r + 1) * n_ref // rounds
            for name, (model, tok) in refs.items():
                if rhi > rlo:
                    parts[name].append(reference_method(model, tok, items[rlo:rhi]))
            runs = [("newslora_base", None), ("newslora_adapter", adapter)]
            for name, which in runs[::1 if r % 2 == 0 else -1]:  # alternate which goes first
                parts[name].append(newslora_score(engine, items[lo:hi], adapter=which, batch_size=args.batch_size))
    out = {name: _total(p) for name, p in parts.items()}
    rate = {name: o["items_per_s"] for name, o in out.items()}
    print(json.dumps({
        "model": "SmolLM2-135M-Instruct", "n": len(items), "n_reference": n_ref, "rounds": rounds,
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
        "newslora_dtype": str(engine.torch_dtype).replace("torch.", ""), "batch_size": args.batch_size,
        "adapter": str(args.adapter) if args.adapter else "random, presets' shape " + json.dumps(PRESET_LORA),
        "load_avg_before": [round(x, 2) for x in load_before], "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        **out,
        "adapter_vs_base": round(rate["newslora_adapter"] / rate["newslora_base"], 3),
        "speedup_vs_reference_fp32": {k: round(rate[k] / rate["reference_fp32"], 2)
                                      for k in ("newslora_base", "newslora_adapter")},
        "speedup_vs_reference_bf16": {k: round(rate[k] / rate["reference_bf16"], 2)
                                      for k in ("newslora_base", "newslora_adapter")},
        "reference_bf16_vs_fp32": round(rate["reference_bf16"] / rate["reference_fp32"], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
