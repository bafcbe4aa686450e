"""LoRA training throughput on this machine: naive PEFT loops in fp32 and bf16, the newslora loop, torchtune.

    python bench/train_throughput.py                      # SmolLM2-135M, 64 AG News articles, batch 16, 3 x 4 steps
    python bench/train_throughput.py --with-torchtune     # also the torchtune backend, if its env is installed
    python bench/train_throughput.py --rounds 1 --steps-per-round 1   # a quick check that it runs

Every backend trains the same LoRA (the TrainSpec default: rank 16 on every linear layer of the decoder)
on the same articles rendered with the alpaca template, batch 16, for the same number of timed steps.
The steps are interleaved so that load from other work on a shared machine falls on all alike: each
round runs one step of each in-process backend in turn, `--steps-per-round` times, then (with
--with-torchtune) one torchtune recipe run of `--steps-per-round` + 1 steps, whose first step is a
warm-up and not timed (its process start, checkpoint load and adapter export are reported apart as
startup_s). Each in-process backend also takes one untimed warm-up step before the first round.

- naive_fp32 / naive_bf16: the model loaded in that dtype, HF forward with labels (logits over the whole
  vocabulary at every position), batches in random order padded to their longest row, PEFT's default
  LoRA forward (LoRA weights fp32). naive_bf16 shows what the dtype alone gives.
- newslora: the `PeftLoraTrainer` steps that `workers.train.train_adapter` runs (bf16 frozen base where
  the CPU has AVX512-BF16/AMX, shared-prefix forward, LM head on target positions only, length-bucketed
  batches).
- newslora_peft_layers: the same loop with `train.lean_forward=false` (PEFT's own LoRA layers instead of
  the packed forward of `workers/modeling/lora_forward.py`): what that forward adds.
- torchtune: `workers.train.torchtune` (timed by `bench/torchtune_throughput.py`), the torchtune LoRA recipe
  in its own environment.

Tokens, per backend:
- data_tokens: the real tokens of the examples trained on (prompt + label + EOS, no padding; the shared
  prompt prefix counted once per example): the same for every backend over the same examples, so
  data_tokens_per_s is the figure the speedups compare.
- executed_tokens: the real tokens the decoder actually ran: the newslora loop runs the shared prefix
  once per batch, the others once per example. padded_tokens adds the padding the batches carried;
  padding_share = 1 - executed / padded.

FLOPs of the work executed (padding excluded, so never more than was computed; `FlopModel` in bench/flops.py,
which bench/infer_throughput.py counts with too):
- decoder linear layers, frozen: forward 2*N a token; backward activation gradients 2*N for the modules
  whose input needs a gradient (none below the lowest adapted layer, none for that layer's q|k|v; no
  weight gradients); N = the decoder's linear parameters (embedding and LM head apart);
- LoRA adapters: forward 2*N_lora, backward weight gradients 2*N_lora, dy @ B, and du @ A where the
  input needs a gradient (6*N_lora a token in all but the lowest adapted layer);
- attention: QK^T and AV forward 4*d a key, backward 8*d where its input needs a gradient, over the causal
  keys of each executed token (d = hidden size; the prefix's keys included for the newslora rows);
- LM head (frozen, tied): 4*V*H a position where it is applied: the target positions for newslora,
  every real position for the naive loops and torchtune (the HF forward computes all logits).
`--top-layers N` adapts only the top N layers in every backend that can (a shorter backward), and adds
newslora_frozen_cache: the newslora loop as a training job runs it then, the layers below the adapted ones
computed once an article before the first step (timed apart: `frozen_cache`) and each step running only the
adapted layers from their kept output; its FLOPs count only those layers (`FlopModel.of(frozen_kept=True)`).
`fraction_of_bf16_peak` divides the executed FLOPs a second by a measured bf16 matmul peak (the fastest
single 1024^3 or 2048^3 matmul, before, between the rounds of and after the run); it cannot exceed 1 unless
the peak is measured low.
`decoder_matmul_ceiling` times the decoder's frozen matmuls alone at a step's token count: the part of
that peak the model's own shapes reach on this machine, a ceiling for any loop. Where the machine's
matmul rate itself moves (an Intel AMX machine of 2026-12-06 measured 0.65 to 2.2 TFLOP/s within minutes),
`per_round` holds, per round, newslora's executed GFLOP/s beside the bf16 peak and that ceiling measured
right after the round's steps: `fraction_of_round_peak` compares work and peak of the same minutes.

Prints the load average at the start and the end (stderr), then one JSON object (stdout).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.flops import FlopModel, Work, matmul_gflops, shape_ceiling_gflops  # noqa: E402
from bench.torchtune_throughput import torchtune_tokens_per_s  # noqa: E402
from core.contracts.dataset import DatasetMeta  # noqa: E402
from core.settings import get_settings  # noqa: E402
from core.context import LocalContext  # noqa: E402
from workers.modeling.registry import cpu_has_fast_bf16, pick_dtype, resolve_model  # noqa: E402
from workers.modeling.prompts import default_instruction  # noqa: E402
from core.specs.train import TrainSpec  # noqa: E402
from workers.train.peft_loop import PeftLoraTrainer  # noqa: E402

LABELS = ["World", "Sports", "Business", "Sci/Tech"]
AG_NEWS = get_settings().shared_data / "ag_news" / "train.jsonl"  # $NEWSLORA_SHARED_DATA
TEST_CACHE = Path.home() / ".cache" / "newslora-test" / "smollm2-135m"


def write_dataset(root: Path, n: int) -> Path:
    rows = [json.loads(x) for x in AG_NEWS.read_text().splitlines()[:n + 8]]
    instruction = default_instruction(LABELS)
    root.mkdir(parents=True)
    recs = [{"id": f"ag-{i}", "instruction": instruction, "input": r["text"], "output": LABELS[r["label"]],
             "label_id": r["label"]} for i, r in enumerate(rows)]
    for name, part in (("train", recs[:n]), ("validation", recs[n:]), ("test", recs[n:])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    DatasetMeta(name="bench", hash=f"bench-{n}", created_at="2026-01-01T00:00:00+00:00", code_version="bench",
                sources={}, label_names=LABELS, label_map={n: i for i, n in enumerate(LABELS)}, template="alpaca",
                instruction=instruction, counts={}, spec={}).save(root)
    return root


# --------------------------------------------------------------------------------------------------
# What a step executed, and what it cost


def padded_batch_work(lengths: Sequence[int]) -> Work:
    """A batch of whole sequences padded to the longest, the LM head at every position."""
    real = sum(lengths)
    return Work(data_tokens=real, executed_tokens=real, padded_tokens=len(lengths) * max(lengths),
                head_positions=real, attn_keys=sum(n * (n + 1) // 2 for n in lengths))


def shared_prefix_work(batch: Any) -> Work:
    """A newslora TrainBatch: the prefix once, each row on top of its keys, the head at the targets."""
    P = batch.prefix_ids.shape[1]
    B, S = batch.input_ids.shape
    rows = batch.attention_mask[:, P:].sum(dim=1).tolist()  # (B,) real tokens after the prefix
    attn = P * (P + 1) // 2 + sum(n * P + n * (n + 1) // 2 for n in rows)
    return Work(data_tokens=int(batch.n_tokens), executed_tokens=P + sum(rows), padded_tokens=P + B * S,
                head_positions=int(batch.n_targets), attn_keys=attn)


# --------------------------------------------------------------------------------------------------
# The backends


class NaiveLoop:
    """PEFT's default LoRA on a model loaded in `dtype`, HF forward with labels, random padded batches."""

    def __init__(self, model_dir: Path, examples: Sequence[Any], spec: TrainSpec, dtype: torch.dtype,
                 pad_id: int) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM
        examples = list(examples)
        random.Random(0).shuffle(examples)
        self.batches = [examples[i:i + spec.batch_size] for i in range(0, len(examples), spec.batch_size)]
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        lora = spec.lora
        layers = lora.adapted_layers(base.config.num_hidden_layers)
        self.model = get_peft_model(base, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                     target_modules=lora.target_modules, layers_to_transform=layers,
                                                     task_type="CAUSAL_LM")).train()
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=spec.learning_rate)
        self.pad = pad_id
        self.dtype = str(dtype).removeprefix("torch.")
        self.i = 0

    def step(self) -> tuple[Work, float]:
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        t = time.perf_counter()  # collation counted, as it is in the newslora step
        S = max(len(e.input_ids) for e in batch)
        ids = torch.tensor([e.input_ids + [self.pad] * (S - len(e.input_ids)) for e in batch])  # (B, S)
        labels = torch.tensor([e.labels + [-100] * (S - len(e.labels)) for e in batch])  # (B, S)
        mask = torch.tensor([[1] * len(e.input_ids) + [0] * (S - len(e.input_ids)) for e in batch])  # (B, S)
        self.model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return padded_batch_work([len(e.input_ids) for e in batch]), time.perf_counter() - t


class NewsloraLoop:
    """The real loop's optimizer step (`PeftLoraTrainer._train_step`): micro-batches, forward, backward, AdamW."""

    def __init__(self, trainer: PeftLoraTrainer) -> None:
        self.trainer = trainer
        self.dtype = str(trainer.dtype).removeprefix("torch.")
        self.losses: list[float] = []

    def step(self) -> tuple[Work, float]:
        tr = self.trainer
        work = Work()
        for batch in tr._micro_batches():  # the same batches _train_step builds next (a seeded order)
            work += shared_prefix_work(batch)
        t = time.perf_counter()
        loss, _ = tr._train_step()
        seconds = time.perf_counter() - t
        tr.step += 1
        self.losses.append(round(loss, 4))
        return work, seconds


def torchtune_round(model_dir: Path, ds: Path, spec: TrainSpec, steps: int, work_dir: Path,
                    mean_keys_per_token: float) -> tuple[Work, float, dict[str, Any]]:
    """One torchtune recipe run of steps + 1 steps; (work, seconds) of the steps after the first."""
    info = torchtune_tokens_per_s(str(model_dir), steps=steps + 1, batch_size=spec.batch_size,
                                  max_seq_len=spec.max_seq_len, dataset_dir=ds, work_dir=work_dir)
    rows = [json.loads(x) for x in (work_dir / "out" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r and r.get("type") != "eval"][1:]  # the steady steps
    tokens = sum(int(r["tokens"]) for r in rows)
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in rows if r.get("tokens_per_s"))
    # Whole sequences, no prefix sharing, logits everywhere; attention keys from the examples' mean. The
    # recipe's padding is not reported by it: padded_tokens 0 reads as unknown.
    work = Work(data_tokens=tokens, executed_tokens=tokens, padded_tokens=0, head_positions=tokens,
                attn_keys=round(tokens * mean_keys_per_token))
    dtype = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}.get(info["dtype"], info["dtype"])
    return work, seconds, {"dtype": dtype, "startup_s": round(info["wall_s"] - seconds, 1),
                           "steps": len(rows), "loss_last": info["loss_last"]}


# --------------------------------------------------------------------------------------------------
# The run


def summarize(work: Work, seconds: float, steps: int, dtype: str, fm: FlopModel, peaks: dict[str, float]) -> dict:
    gflops = fm.flops(work) / seconds / 1e9 if seconds else 0.0
    own_peak = peaks["float32"] if dtype == "float32" else peaks["bfloat16"]
    return {"dtype": dtype, "steps": steps, "seconds": round(seconds, 2),
            **asdict(work) | ({"padded_tokens": None} if not work.padded_tokens else {}),
            "padding_share": round(1 - work.executed_tokens / work.padded_tokens, 3) if work.padded_tokens else None,
            "data_tokens_per_s": round(work.data_tokens / seconds, 1) if seconds else None,
            "executed_tokens_per_s": round(work.executed_tokens / seconds, 1) if seconds else None,
            "executed_gflops_per_s": round(gflops, 1),
            "fraction_of_bf16_peak": round(gflops / peaks["bfloat16"], 3),
            "fraction_of_own_dtype_peak": round(gflops / own_peak, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(TEST_CACHE) if TEST_CACHE.is_dir() else "smollm2-135m")
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of interleaved steps")
    ap.add_argument("--steps-per-round", type=int, default=4, help="timed steps of each backend a round")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--skip-peft-layers", action="store_true",
                    help="skip the newslora loop through PEFT's own LoRA layers (train.lean_forward=false)")
    ap.add_argument("--with-torchtune", action="store_true", help="also time the torchtune backend")
    ap.add_argument("--top-layers", type=int, default=None,
                    help="lora.top_layers for every backend that can (the naive loops too; torchtune cannot)")
    args = ap.parse_args()

    load_before = [round(x, 2) for x in os.getloadavg()]
    print(f"load average before (1, 5, 15 min): {load_before}", file=sys.stderr)
    model_dir = resolve_model(args.model)
    peaks = {"bfloat16": matmul_gflops(torch.bfloat16), "float32": matmul_gflops(torch.float32)}
    timed = {}
    with tempfile.TemporaryDirectory(prefix="newslora-train-bench-") as tmp:
        ds = write_dataset(Path(tmp) / "ds", args.examples)
        spec = TrainSpec(dataset_id=1, model=str(model_dir), batch_size=args.batch_size,
                         max_steps=1 + args.rounds * args.steps_per_round, warmup_steps=1, eval_every=10_000,
                         save_every=10_000, val_samples=8, lora={"top_layers": args.top_layers})
        trainer = PeftLoraTrainer(spec, ds, Path(tmp) / "run", LocalContext(work_dir=Path(tmp)))
        trainer.setup()
        examples = trainer.train_examples
        pad = trainer.tokenizer.pad_token_id if trainer.tokenizer.pad_token_id is not None else \
            trainer.tokenizer.eos_token_id
        loops: dict[str, Any] = {}
        if not args.skip_naive:
            loops["naive_fp32"] = NaiveLoop(model_dir, examples, spec, torch.float32, pad)
            loops["naive_bf16"] = NaiveLoop(model_dir, examples, spec, torch.bfloat16, pad)
        loops["newslora"] = NewsloraLoop(trainer)
        if not args.skip_peft_layers:  # the same loop through PEFT's own LoRA layers: what lora_forward adds
            plain = PeftLoraTrainer(spec.model_copy(update={"lean_forward": False}), ds, Path(tmp) / "run-peft",
                                    LocalContext(work_dir=Path(tmp)))
            plain.setup()
            loops["newslora_peft_layers"] = NewsloraLoop(plain)
        frozen_info: dict[str, Any] = {}
        if args.top_layers:  # what a training job runs with top_layers: the frozen layers' output kept
            kept = PeftLoraTrainer(spec, ds, Path(tmp) / "run-kept", LocalContext(work_dir=Path(tmp)))
            kept.setup()
            t = time.perf_counter()
            kept.frozen = kept._setup_frozen_cache()
            seconds = time.perf_counter() - t
            if kept.frozen is not None:
                frozen_info = {"layers": kept.frozen.layers, "articles": len(examples), "seconds": round(seconds, 2),
                               "articles_per_s": round(len(examples) / seconds, 1),
                               "mib": round(kept.frozen.nbytes() / 2**20, 1)}
                loops["newslora_frozen_cache"] = NewsloraLoop(kept)
        for name, loop in loops.items():
            loop.step()  # warm-up, not timed
            print(f"{name}: warm-up step done", file=sys.stderr)
        names = list(loops) + (["torchtune"] if args.with_torchtune else [])
        acc = {name: [Work(), 0.0, 0] for name in names}
        tt_info: dict[str, Any] = {}
        lengths = [len(e.input_ids) for e in examples]
        mean_keys = sum(n * (n + 1) / 2 for n in lengths) / sum(lengths)
        rounds: list[dict[str, Any]] = []
        for r in range(args.rounds):
            round_work, round_seconds = Work(), 0.0  # newslora's steps of this round
            for _ in range(args.steps_per_round):
                for name, loop in loops.items():
                    work, seconds = loop.step()
                    acc[name][0] += work
                    acc[name][1] += seconds
                    acc[name][2] += 1
                    if name == "newslora":
                        round_work += work
                        round_seconds += seconds
            if args.with_torchtune and args.top_layers:
                tt_info = {"error": "not run: the torchtune backend adapts every layer (--top-layers)"}
            if args.with_torchtune and "error" not in tt_info:
                try:
                    work, seconds, info = torchtune_round(model_dir, ds, spec, args.steps_per_round,
                                                          Path(tmp) / f"tt-{r}", mean_keys)
                    acc["torchtune"][0] += work
                    acc["torchtune"][1] += seconds
                    acc["torchtune"][2] += info["steps"]
                    tt_info = {**info, "startup_s": tt_info.get("startup_s", []) + [info["startup_s"]]}
                except Exception as e:  # noqa: BLE001 - report why the figure is missing, keep the others
                    tt_info = {"error": f"{type(e).__name__}: {e}"}
            # This CPU's bf16 matmul rate moves between rounds (an AMX machine of 2026-12-06: 0.65-2.2 TFLOP/s
            # within minutes), so the round's own peak and matmul ceiling are measured beside its steps
            step_tokens = round(round_work.executed_tokens / args.steps_per_round)
            rounds.append({"newslora_work": round_work, "newslora_seconds": round_seconds,
                           "bf16_peak": matmul_gflops(torch.bfloat16, reps=6),
                           "ceiling": shape_ceiling_gflops(model_dir, step_tokens, reps=2)})
            print(f"round {r + 1} of {args.rounds} done: " + ", ".join(
                f"{n} {a[0].data_tokens / a[1]:.0f} tokens/s" for n, a in acc.items() if a[1]), file=sys.stderr)
        fm = FlopModel.of(model_dir, spec.lora)
        fm_kept = FlopModel.of(model_dir, spec.lora, frozen_kept=True)
        dtypes = {name: loop.dtype for name, loop in loops.items()} | {"torchtune": tt_info.get("dtype", "?")}
        losses = loops["newslora"].losses
        prefix_len = examples[0].prefix_len
        exec_tokens = acc["newslora"][0].executed_tokens / max(1, acc["newslora"][2])  # a step's executed tokens
        lean_used = trainer.lean
        del loops, trainer
    ceiling = shape_ceiling_gflops(model_dir, round(exec_tokens))
    peaks_after = {"bfloat16": matmul_gflops(torch.bfloat16), "float32": matmul_gflops(torch.float32)}
    best = {k: max(peaks[k], peaks_after[k]) for k in peaks}  # a peak: the best measurement, the rounds' too
    best["bfloat16"] = max([best["bfloat16"]] + [x["bf16_peak"] for x in rounds])
    for name in names:
        if name == "torchtune" and "error" in tt_info:
            timed[name] = {"error": tt_info["error"]}
            continue
        timed[name] = summarize(*acc[name], dtypes[name], fm_kept if name == "newslora_frozen_cache" else fm, best)
    timed["newslora"]["losses"] = losses  # the warm-up step's first
    if "torchtune" in timed and "error" not in timed["torchtune"]:
        timed["torchtune"] |= {k: tt_info[k] for k in ("startup_s", "loss_last")}

    def speedup(over: str) -> float | None:
        a, b = timed.get("newslora", {}), timed.get(over, {})
        return round(a["data_tokens_per_s"] / b["data_tokens_per_s"], 2) if b.get("data_tokens_per_s") else None

    load_after = [round(x, 2) for x in os.getloadavg()]
    print(f"load average after (1, 5, 15 min): {load_after}", file=sys.stderr)
    out = {
        "model": args.model, "examples": args.examples, "batch_size": args.batch_size,
        "rounds": args.rounds, "steps_per_round": args.steps_per_round,
        "lora": spec.lora.model_dump(), "max_seq_len": spec.max_seq_len, "prefix_tokens": prefix_len,
        "cpu_has_fast_bf16": cpu_has_fast_bf16(), "threads": torch.get_num_threads(),
        "dtype_auto": str(pick_dtype("auto", "cpu")).removeprefix("torch."),
        "load_average_before": load_before, "load_average_after": load_after,
        "matmul_peak_gflops": {"bfloat16": round(best["bfloat16"], 1), "float32": round(best["float32"], 1),
                               "before": {k: round(v, 1) for k, v in peaks.items()},
                               "after": {k: round(v, 1) for k, v in peaks_after.items()},
                               "rounds_bfloat16": [round(x["bf16_peak"], 1) for x in rounds]},
        "flop_model": asdict(fm),
        "frozen_cache": frozen_info or None,  # --top-layers: the one-off pass a training job makes first
        "newslora_lean_forward": lean_used,
        # the decoder's own frozen matmuls (forward and activation gradient) at a newslora step's executed
        # token count, bf16, nothing else: the fastest any loop could run the bulk of this work here
        "decoder_matmul_ceiling": {"tokens": round(exec_tokens), "gflops": round(ceiling, 1),
                                   "fraction_of_bf16_peak": round(ceiling / best["bfloat16"], 3)},
        # per round: newslora's executed GFLOP/s against the bf16 peak and the decoder's matmul ceiling
        # measured right after that round's steps (the fairer fraction where the peak itself moves)
        "per_round": [{"newslora_gflops": round(g := fm.flops(x["newslora_work"]) / x["newslora_seconds"] / 1e9, 1),
                    "bf16_peak_gflops": round(x["bf16_peak"], 1), "ceiling_gflops": round(x["ceiling"], 1),
                    "fraction_of_round_peak": round(g / x["bf16_peak"], 3),
                    "fraction_of_round_ceiling": round(g / x["ceiling"], 3)} for x in rounds],
        "backends": timed,
        "newslora_speedup_over_naive_fp32": speedup("naive_fp32"),
        "newslora_speedup_over_naive_bf16": speedup("naive_bf16"),
        "newslora_speedup_over_torchtune": speedup("torchtune"),
        "newslora_speedup_over_peft_layers": speedup("newslora_peft_layers"),
        # --top-layers: a step from the kept output against the same step running every layer
        "frozen_cache_step_speedup": (round(timed["newslora_frozen_cache"]["data_tokens_per_s"]
                                            / timed["newslora"]["data_tokens_per_s"], 2)
                                      if "newslora_frozen_cache" in timed else None),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
