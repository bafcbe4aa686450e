"""Classification throughput: the reference project's generate-and-parse vs newslora's score mode, same run.

    python bench/infer_throughput.py --n 400            # SmolLM2-135M, AG News test articles, this CPU
    python bench/infer_throughput.py --n 48 --batch-size 48

(a) reference: Alpaca prompt, HF `generate` (greedy, max 30 new tokens, repetition penalty 1.2),
    batch 8, fp32, label parsed from the text (first label name found).
(b) newslora score mode: shared-prefix KV cache, length-bucketed batches, label log-likelihoods,
    LM head on the needed positions only, dtype "auto" (bf16 where the CPU has it).
Both read the first articles of test.csv (classes interleaved as published): score mode all N, the slow
reference the first --n-reference, in interleaved rounds (8 reference articles, then N/rounds score-mode
articles) so that other work on a shared CPU slows both alike. Prints JSON; model loading is not timed.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import re
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
AG_NEWS = Path(os.environ.get("NEWSLORA_SHARED_DATA", REPO.parent / "shared" / "data")) / "ag_news"
LABELS = ["World", "Sports", "Business", "Sci/Tech"]


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


def load_reference(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), tok


def reference_method(model, tok, items: list[dict], *, batch_size: int = 8) -> dict:
    """The reference project's inference: generate 30 tokens per article and look for a label in the text."""
    from workers.prompts import default_instruction, render_prompt
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
    seconds = time.perf_counter() - t0
    return {"n": len(items), "seconds": seconds, "correct": correct}


def newslora_score(engine, model_dir: Path, items: list[dict], *, batch_size: int, dtype: str) -> dict:
    from workers.context import LocalContext
    from workers.infer import classify_items
    from workers.prompts import default_instruction
    from workers.specs.classify import ClassifySpec
    spec = ClassifySpec(items=items, batch_size=batch_size, dtype=dtype, mode="score")
    t0 = time.perf_counter()
    summary = classify_items(items, engine=engine, model_ref=str(model_dir), adapter=None, label_names=LABELS,
                             instruction=default_instruction(LABELS), template="alpaca", spec=spec,
                             ctx=LocalContext())
    seconds = time.perf_counter() - t0
    return {"n": len(items), "seconds": seconds, "correct": round(summary["accuracy"] * len(items))}


def _total(parts: list[dict]) -> dict:
    n, seconds, correct = (sum(p[k] for p in parts) for k in ("n", "seconds", "correct"))
    return {"n": n, "seconds": round(seconds, 2), "items_per_s": round(n / seconds, 4),
            "accuracy": round(correct / n, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400, help="articles (first N of test.csv)")
    ap.add_argument("--n-reference", type=int, default=None,
                    help="articles for the slow reference method (default: same as --n); its items/s is a rate, "
                         "so a smaller sample only widens its error bar")
    ap.add_argument("--batch-size", type=int, default=32, help="newslora score-mode batch size")
    ap.add_argument("--dtype", default="auto", help="newslora dtype (auto = bf16 where the CPU has it)")
    ap.add_argument("--model-dir", type=Path, default=None, help="SmolLM2 checkpoint folder (default: the preset)")
    args = ap.parse_args()
    from workers.models import resolve_model
    model_dir = args.model_dir or resolve_model("smollm2-135m")
    items = read_ag_news_test(AG_NEWS / "test.csv", args.n)
    n_ref = min(args.n_reference or args.n, len(items))
    from workers.infer import get_engine
    engine = get_engine(str(model_dir), dtype=args.dtype)
    ref_model, ref_tok = load_reference(model_dir)
    # The CPU is shared: interleave the two methods in rounds so that load changes hit both alike.
    rounds = max(1, math.ceil(n_ref / 8))
    a_parts, b_parts = [], []
    for r in range(rounds):
        lo, hi = r * len(items) // rounds, (r + 1) * len(items) // rounds
        b_parts.append(newslora_score(engine, model_dir, items[lo:hi], batch_size=args.batch_size,
                                      dtype=args.dtype))
        a_parts.append(reference_method(ref_model, ref_tok, items[r * 8:min((r + 1) * 8, n_ref)]))
    a, b = _total(a_parts), _total(b_parts)
    b.update(dtype=str(engine.torch_dtype).replace("torch.", ""), batch_size=args.batch_size)
    print(json.dumps({
        "model": "SmolLM2-135M-Instruct", "n": len(items), "n_reference": n_ref,
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "load_avg_1m": os.getloadavg()[0],
        "rounds": rounds,
        "reference_generate": a,
        "newslora_score": b,
        "speedup": round(b["items_per_s"] / a["items_per_s"], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
