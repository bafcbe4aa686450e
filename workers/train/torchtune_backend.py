"""The torchtune training backend: torchtune's `lora_finetune_single_device` recipe behind one function.

    from workers.train.torchtune_backend import train_torchtune
    result = train_torchtune(spec, dataset_dir, out_dir, ctx)     # spec.backend == "torchtune"

torchtune 0.6.1 (its last release) needs torchao <= 0.13, which PEFT 0.21 refuses, so torchtune lives
in its own environment (`bash scripts/setup_torchtune_env.sh` -> `.venv-torchtune`) and the recipe runs
there as a subprocess. This module stays in the main venv and does everything around the recipe:

1. tokenises the prepared dataset with the model's HF tokenizer and the same prompt text as the PEFT
   loop (`workers.prompts.render_prompt`), and writes it as token ids in the exact order of training;
2. writes the recipe's YAML config (model builder derived from the checkpoint's config.json);
3. runs `workers/train/torchtune_entry.py` with the isolated python, turning its metric lines into
   progress events and terminating it on cancel;
4. turns torchtune's PEFT-format adapter into an adapter folder that loads with plain
   `peft.PeftModel.from_pretrained(base, out_dir / "adapter")`, plus `newslora.json`.

Everything torchtune-specific lives here and in `torchtune_entry.py`: dropping the backend means
deleting these two files and the setup script.
"""
from __future__ import annotations

import json
import math
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from workers.context import JobCancelled, JobContext
from workers.models import cpu_has_fast_bf16, model_digest, pick_device, resolve_model
from workers.prompts import render_prompt
from workers.specs.train import LoraSpec, TrainSpec

REPO = Path(__file__).resolve().parents[2]
ENTRY = Path(__file__).resolve().with_name("torchtune_entry.py")
DEFAULT_VENV = REPO / ".venv-torchtune"
TORCHTUNE_VERSION = "0.6.1"
METRIC_PREFIX = "NEWSLORA_METRIC "  # the line prefix torchtune_entry.StdoutMetricLogger prints
IGNORE_INDEX = -100  # torchtune's CrossEntropy ignore index, as in the PEFT loop
TERMINATE_GRACE_S = 10.0

# HF (PEFT) module names -> torchtune's names in `lora_llama3_2`.
_ATTN_TO_TUNE = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "output_proj",
                 "output_proj": "output_proj"}
_MLP_HF = {"gate_proj", "up_proj", "down_proj"}
_MLP_TUNE = {"w1", "w2", "w3"}


class TorchtuneEnvMissing(RuntimeError):
    """The isolated torchtune environment is not there."""


class TorchtuneRunFailed(RuntimeError):
    """The recipe subprocess exited with an error."""


@dataclass(frozen=True)
class Encoded:
    tokens: list[int]
    labels: list[int]  # aligned with tokens; IGNORE_INDEX where no loss is taken


# ---------------------------------------------------------------------------------------------
# The environment


def torchtune_python() -> Path:
    """The isolated environment's python.

    Looked up in order: $NEWSLORA_TORCHTUNE_PYTHON (a python executable), $NEWSLORA_TORCHTUNE_VENV
    (a venv folder), the repo's `.venv-torchtune`.

    Raises:
        TorchtuneEnvMissing: none is there, with the command that creates it.
    """
    explicit = os.environ.get("NEWSLORA_TORCHTUNE_PYTHON")
    if explicit:
        path = Path(explicit).expanduser()
        where = f"NEWSLORA_TORCHTUNE_PYTHON={explicit}"
    else:
        venv = Path(os.environ.get("NEWSLORA_TORCHTUNE_VENV") or DEFAULT_VENV).expanduser()
        path = venv / "bin" / "python"
        where = str(venv)
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise TorchtuneEnvMissing(
            f"the torchtune backend needs its isolated environment, and there is none at {where}: run "
            f"`bash scripts/setup_torchtune_env.sh` (it creates {DEFAULT_VENV}; set NEWSLORA_TORCHTUNE_VENV or "
            f"NEWSLORA_TORCHTUNE_PYTHON to use another), or train with backend 'peft'")
    return path


# ---------------------------------------------------------------------------------------------
# Data


def read_prepared_dataset(dataset_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """(meta, train records, validation records) of a prepared-dataset folder.

    Raises:
        FileNotFoundError: meta.json or train.jsonl is missing.
        ValueError: a record lacks a field training needs.
    """
    dataset_dir = Path(dataset_dir)
    for name in ("meta.json", "train.jsonl"):
        if not (dataset_dir / name).is_file():
            raise FileNotFoundError(
                f"{dataset_dir} is not a prepared dataset: {name} is missing (run a prep job first)")
    meta = json.loads((dataset_dir / "meta.json").read_text())
    for key in ("label_names", "template"):
        if key not in meta:
            raise ValueError(f"{dataset_dir / 'meta.json'} lacks {key!r}: re-run the prep job")

    def read(name: str) -> list[dict[str, Any]]:
        path = dataset_dir / name
        if not path.is_file():
            return []
        rows = []
        with path.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                missing = {"input", "output"} - row.keys()
                if missing:
                    raise ValueError(f"{path}:{n} lacks {sorted(missing)}: re-run the prep job")
                rows.append(row)
        return rows

    train = read("train.jsonl")
    if not train:
        raise ValueError(f"{dataset_dir / 'train.jsonl'} holds no records")
    return meta, train, read("validation.jsonl")


def encode_example(tokenizer: Any, record: dict[str, Any], *, instruction: str, template: str,
                   max_seq_len: int, train_on_input: bool) -> Encoded:
    """Prompt + response token ids, with loss on the response (and the prompt if train_on_input).

    The prompt is `render_prompt(record instruction or the dataset's, record input)`; the response is the
    record's output followed by EOS. Where the pair is longer than max_seq_len, the input text is cut
    (never the label, never the prompt's header or its "Response" tail).

    Raises:
        ValueError: the response alone does not fit in max_seq_len.
    """
    instruction = record.get("instruction") or instruction
    response = tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    text = record["input"]
    prompt_ids = _prompt_ids(tokenizer, instruction, text, template)
    if len(prompt_ids) + len(response) > max_seq_len:
        room = max_seq_len - len(response)
        input_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        fixed = len(prompt_ids) - len(input_ids)  # header + tail, roughly
        keep = max(0, room - fixed)
        while True:
            text = tokenizer.decode(input_ids[:keep])
            prompt_ids = _prompt_ids(tokenizer, instruction, text, template)
            if len(prompt_ids) <= room or keep == 0:
                break
            keep = max(0, keep - (len(prompt_ids) - room))
        if len(prompt_ids) > room:
            raise ValueError(
                f"max_seq_len={max_seq_len} is too short for the prompt's fixed text and the response "
                f"({len(prompt_ids)} + {len(response)} tokens with no input): raise max_seq_len")
    labels = (list(prompt_ids) if train_on_input else [IGNORE_INDEX] * len(prompt_ids)) + response
    return Encoded(tokens=list(prompt_ids) + response, labels=labels)


def _prompt_ids(tokenizer: Any, instruction: str, text: str, template: str) -> list[int]:
    prompt = render_prompt(instruction, text, template=template, tokenizer=tokenizer)
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def plan_steps(spec: TrainSpec, n_records: int) -> int:
    """Optimizer steps to run: spec.max_steps, else spec.epochs over the records (at least 1).

    Raises:
        ValueError: fewer records than one optimizer step consumes.
    """
    per_step = spec.batch_size * spec.grad_accum
    if spec.max_steps is not None:
        return spec.max_steps
    if n_records < per_step:
        raise ValueError(
            f"{n_records} training records are fewer than one optimizer step takes (batch_size "
            f"{spec.batch_size} x grad_accum {spec.grad_accum}): lower them or set max_steps")
    return max(1, math.floor(spec.epochs * n_records / per_step))


def sample_order(n_records: int, n_samples: int, seed: int) -> list[int]:
    """Record indices in training order: a fresh seeded shuffle for each pass over the records."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < n_samples:
        perm = list(range(n_records))
        rng.shuffle(perm)
        order.extend(perm)
    return order[:n_samples]


# ---------------------------------------------------------------------------------------------
# The recipe's config


def lora_modules(lora: LoraSpec) -> tuple[list[str], bool]:
    """(torchtune attention modules, apply_lora_to_mlp) for the spec's target modules.

    Raises:
        ValueError: a module torchtune's Llama builder cannot put LoRA on, or only part of the MLP
            (torchtune adapts its three MLP projections together or not at all).
    """
    attn, mlp, unknown = [], set(), []
    for name in lora.target_modules:
        if name in _ATTN_TO_TUNE:
            if _ATTN_TO_TUNE[name] not in attn:
                attn.append(_ATTN_TO_TUNE[name])
        elif name in _MLP_HF | _MLP_TUNE:
            mlp.add(name)
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(
            f"lora.target_modules {unknown} are not modules the torchtune backend can adapt: use q_proj, "
            f"k_proj, v_proj, o_proj and (all three together) gate_proj, up_proj, down_proj")
    if mlp and mlp not in (_MLP_HF, _MLP_TUNE):
        raise ValueError(
            f"lora.target_modules names only {sorted(mlp)} of the MLP: torchtune adapts gate_proj, up_proj "
            f"and down_proj together; name all three or none, or use backend 'peft'")
    if not attn:
        raise ValueError("the torchtune backend needs at least one attention module in lora.target_modules "
                         "(q_proj, k_proj, v_proj or o_proj)")
    return attn, bool(mlp)


def model_builder_args(model_dir: Path) -> dict[str, Any]:
    """`torchtune.models.llama3_2.lora_llama3_2` shape arguments read from a Llama checkpoint's config.json.

    For SmolLM2-135M: vocab 49152, 30 layers, 9 heads, 3 KV heads, embed 576, intermediate 1536,
    max_seq_len 8192, rope_base 100000, tied embeddings. scale_factor=1 makes torchtune's Llama-3
    scaled RoPE the plain RoPE these models use.

    Raises:
        ValueError: the checkpoint is not a plain Llama that torchtune's builder reproduces.
    """
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        raise ValueError(f"{model_dir}: the torchtune backend trains Llama-architecture checkpoints, this one is "
                         f"{cfg.get('model_type')!r}; use backend 'peft'")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type != "default":
        raise ValueError(f"{model_dir}: RoPE type {rope_type!r} is not supported by the torchtune backend; "
                         f"use backend 'peft'")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ValueError(f"{model_dir}: projections with bias are not supported by torchtune's Llama builder")
    heads, dim = cfg["num_attention_heads"], cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or dim // heads
    if head_dim * heads != dim:
        raise ValueError(f"{model_dir}: head_dim {head_dim} x {heads} heads != hidden_size {dim}; torchtune's "
                         f"builder derives head_dim = hidden_size // heads")
    return {
        "vocab_size": cfg["vocab_size"],
        "num_layers": cfg["num_hidden_layers"],
        "num_heads": heads,
        "num_kv_heads": cfg.get("num_key_value_heads") or heads,
        "embed_dim": dim,
        "intermediate_dim": cfg["intermediate_size"],
        "max_seq_len": cfg.get("max_position_embeddings", 4096),
        "norm_eps": cfg.get("rms_norm_eps", 1e-5),
        "rope_base": rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
        "scale_factor": 1,
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
    }


def recipe_dtype(spec: TrainSpec, device: str) -> str:
    """bf16 where the hardware has it fast (a CUDA GPU, or a CPU with AMX/AVX512-BF16), else fp32.

    Raises:
        ValueError: fp16, which the recipe does not support.
    """
    if spec.dtype == "fp16":
        raise ValueError("the torchtune recipe trains in bf16 or fp32, not fp16: set dtype to bf16, fp32 or auto")
    if spec.dtype != "auto":
        return spec.dtype
    if device.startswith("cuda"):
        return "bf16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def recipe_config(spec: TrainSpec, *, model_dir: Path, run_dir: Path, tokens_path: Path, total_steps: int,
                  pad_id: int, device: str, dtype: str, keep_merged: bool = False) -> dict[str, Any]:
    """The YAML config (as a dict) for torchtune's `lora_finetune_single_device` recipe."""
    attn, mlp = lora_modules(spec.lora)
    weights = sorted(p.name for p in Path(model_dir).glob("*.safetensors"))
    if not weights:
        raise ValueError(f"{model_dir} has no *.safetensors weights: torchtune's HF checkpointer reads "
                         f"safetensors; re-save the model with save_pretrained()")
    return {
        "output_dir": str(run_dir),
        "model": {
            "_component_": "torchtune.models.llama3_2.lora_llama3_2",
            "lora_attn_modules": attn,
            "apply_lora_to_mlp": mlp,
            "apply_lora_to_output": False,
            **model_builder_args(model_dir),
            "lora_rank": spec.lora.rank,
            "lora_alpha": spec.lora.alpha,
            "lora_dropout": spec.lora.dropout,
        },
        # The data arrive tokenised; the recipe only reads the tokenizer's pad_id.
        "tokenizer": {"_component_": "torchtune_entry.TokenizerStub", "pad_id": pad_id},
        "checkpointer": {
            "_component_": "torchtune.training.FullModelHFCheckpointer",
            "checkpoint_dir": str(model_dir),
            "checkpoint_files": weights,
            "recipe_checkpoint": None,
            "output_dir": str(run_dir),
            "model_type": "LLAMA3_2",
        },
        "resume_from_checkpoint": False,
        "save_adapter_weights_only": not keep_merged,  # the merged full model only for verification
        "dataset": {"_component_": "torchtune_entry.token_dataset", "path": str(tokens_path)},
        "collate_fn": "torchtune.data.padded_collate_sft",
        "seed": spec.seed,
        "shuffle": False,  # the token file is already in training order (seeded shuffle per pass)
        "batch_size": spec.batch_size,
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": spec.learning_rate,
                      "weight_decay": spec.weight_decay},
        "lr_scheduler": {"_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup",
                         "num_warmup_steps": spec.warmup_steps},
        "loss": {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"},
        # One pass over a token file that holds exactly total_steps optimizer steps of samples.
        "epochs": 1,
        "max_steps_per_epoch": total_steps,
        "gradient_accumulation_steps": spec.grad_accum,
        "clip_grad_norm": None,
        "compile": False,
        "metric_logger": {"_component_": "torchtune_entry.StdoutMetricLogger"},
        "log_every_n_steps": 1,
        "log_peak_memory_stats": False,
        "device": "cuda" if device.startswith("cuda") else device,
        "dtype": dtype,
        "enable_activation_checkpointing": False,
        "enable_activation_offloading": False,
        "profiler": {"_component_": "torchtune.training.setup_torch_profiler", "enabled": False},
    }


# ---------------------------------------------------------------------------------------------
# Running the recipe


def run_recipe(python: Path, config_path: Path, ctx: JobContext, *, total_steps: int,
               step_tokens: list[int], log_path: Path) -> list[dict[str, Any]]:
    """Run the recipe subprocess to its end; returns one history row per optimizer step.

    Each metric line becomes a `ctx.progress` event; `ctx.check_cancel()` is polled about twice a
    second, and on cancel the subprocess (and its process group) gets SIGTERM, then SIGKILL.

    Raises:
        JobCancelled: the job was cancelled (the subprocess is gone when this is raised).
        TorchtuneRunFailed: the recipe exited with an error; the message holds its last lines.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    cmd = [str(python), str(ENTRY), "--config", str(config_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=env, cwd=str(config_path.parent), start_new_session=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    history: list[dict[str, Any]] = []
    tail: list[str] = []
    try:
        with log_path.open("w", encoding="utf-8") as log_fh:
            while True:
                ctx.check_cancel()
                try:
                    line = lines.get(timeout=0.5)
                except queue.Empty:
                    continue
                if line is None:
                    break
                log_fh.write(line)
                tail = (tail + [line.rstrip()])[-40:]
                if line.startswith(METRIC_PREFIX):
                    row = _history_row(json.loads(line[len(METRIC_PREFIX):]), history, step_tokens)
                    history.append(row)
                    ctx.progress(row["step"], total_steps, message="train", loss=row["loss"], lr=row["lr"],
                                 tokens_per_s=row.get("tokens_per_s"))
    except BaseException:
        _terminate(proc)
        raise
    rc = proc.wait()
    if rc != 0:
        raise TorchtuneRunFailed(
            f"torchtune's recipe exited with status {rc}; full log: {log_path}; last lines:\n" + "\n".join(tail))
    return history


def _history_row(raw: dict[str, Any], history: list[dict[str, Any]], step_tokens: list[int]) -> dict[str, Any]:
    step = int(raw["step"])
    row: dict[str, Any] = {"step": step, "loss": raw["loss"], "lr": raw["lr"], "time": raw.get("time")}
    if history and row["time"] is not None and history[-1]["time"] is not None and step - 1 < len(step_tokens):
        row["tokens_per_s"] = step_tokens[step - 1] / max(row["time"] - history[-1]["time"], 1e-9)
    return row


def _terminate(proc: subprocess.Popen) -> None:
    """SIGTERM the recipe's process group, then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=TERMINATE_GRACE_S)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


# ---------------------------------------------------------------------------------------------
# The adapter


def export_peft_adapter(torchtune_epoch_dir: Path, adapter_dir: Path, *, lora: LoraSpec,
                        base_model_path: Path) -> Path:
    """Turn torchtune's PEFT-format adapter output into a PEFT adapter folder.

    torchtune's HF checkpointer already writes `adapter_model.safetensors` with PEFT key names
    (`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`) and with lora_B of q/k
    permuted back from torchtune's interleaved RoPE layout. Its `adapter_config.json` lacks task type
    and dropout, so a full LoraConfig is written instead.

    Raises:
        TorchtuneRunFailed: torchtune wrote no adapter.
    """
    import torch
    from peft import LoraConfig
    from safetensors.torch import load_file, save_file

    src = Path(torchtune_epoch_dir) / "adapter_model.safetensors"
    if not src.is_file():
        raise TorchtuneRunFailed(f"torchtune wrote no adapter_model.safetensors under {torchtune_epoch_dir}")
    weights = {k: v.to(torch.float32).contiguous() for k, v in load_file(src).items()}
    hf_modules = sorted({k.split(".")[-3] for k in weights})  # ...q_proj.lora_A.weight -> q_proj
    adapter_dir.mkdir(parents=True, exist_ok=True)
    save_file(weights, adapter_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=hf_modules,
               bias="none", task_type="CAUSAL_LM",
               base_model_name_or_path=str(base_model_path)).save_pretrained(adapter_dir)
    return adapter_dir


# ---------------------------------------------------------------------------------------------
# The entry point


def train_torchtune(spec: TrainSpec, dataset_dir: Path, out_dir: Path, ctx: JobContext, *,
                    keep_merged: bool = False) -> dict[str, Any]:
    """LoRA-fine-tune spec.model on a prepared dataset with torchtune's single-device recipe.

    Args:
        spec: the training spec (backend "torchtune").
        dataset_dir: a prepared dataset (meta.json, train.jsonl, validation.jsonl).
        out_dir: the job's output folder; the adapter goes to out_dir/adapter, torchtune's run to
            out_dir/torchtune (its config, token file and log are kept; its checkpoints are not,
            unless keep_merged).
        ctx: progress, events, cancellation.
        keep_merged: also keep torchtune's own merged full checkpoint under out_dir/torchtune/epoch_0
            (for checking the exported adapter against it).

    Returns:
        {"adapter_dir", "base_model", "base_model_digest", "template", "instruction", "label_names",
         "dataset_hash", "steps", "metrics", "history", "resumed_from_step"}.

    Raises:
        TorchtuneEnvMissing: the isolated environment has not been created.
        JobCancelled: cancelled while training (the subprocess has been terminated).
        TorchtuneRunFailed: the recipe failed.
        ValueError / FileNotFoundError: bad dataset, model or spec, saying what to change.
    """
    from workers.models import load_tokenizer

    python = torchtune_python()
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    meta, records, _validation = read_prepared_dataset(dataset_dir)
    label_names = list(meta["label_names"])
    template = meta["template"]
    instruction = meta.get("instruction") or ""
    if spec.max_train_samples is not None:
        records = records[: spec.max_train_samples]
    model_dir = resolve_model(spec.model)
    device = pick_device(spec.device)
    dtype = recipe_dtype(spec, device)
    lora_modules(spec.lora)  # fail on bad target modules before tokenising

    run_dir = out_dir / "torchtune"
    if run_dir.exists():  # a re-delivered job starts the recipe over: it cannot resume mid-epoch
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    ctx.check_cancel()

    tokenizer = load_tokenizer(model_dir)
    encoded = [encode_example(tokenizer, r, instruction=instruction, template=template,
                              max_seq_len=spec.max_seq_len, train_on_input=spec.train_on_input)
               for r in records]
    total_steps = plan_steps(spec, len(encoded))
    per_step = spec.batch_size * spec.grad_accum
    order = sample_order(len(encoded), total_steps * per_step, spec.seed)
    tokens_path = run_dir / "train_tokens.jsonl"
    with tokens_path.open("w", encoding="utf-8") as fh:
        for i in order:
            fh.write(json.dumps({"tokens": encoded[i].tokens, "labels": encoded[i].labels}) + "\n")
    # Input tokens (padding excluded) each optimizer step consumes: the throughput figure's numerator.
    step_tokens = [sum(len(encoded[i].tokens) for i in order[s * per_step:(s + 1) * per_step])
                   for s in range(total_steps)]

    config = recipe_config(spec, model_dir=model_dir, run_dir=run_dir, tokens_path=tokens_path,
                           total_steps=total_steps, pad_id=tokenizer.pad_token_id, device=device, dtype=dtype,
                           keep_merged=keep_merged)
    config_path = run_dir / "torchtune.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    ctx.event("torchtune: starting lora_finetune_single_device",
              metrics={"steps": total_steps, "examples": len(encoded), "device": device, "dtype": dtype})

    t0 = time.perf_counter()
    history = run_recipe(python, config_path, ctx, total_steps=total_steps, step_tokens=step_tokens,
                         log_path=run_dir / "recipe.log")
    train_seconds = time.perf_counter() - t0
    if len(history) != total_steps:
        raise TorchtuneRunFailed(f"torchtune logged {len(history)} optimizer steps, {total_steps} were planned; "
                                 f"see {run_dir / 'recipe.log'}")

    adapter_dir = export_peft_adapter(run_dir / "epoch_0", out_dir / "adapter", lora=spec.lora,
                                      base_model_path=model_dir)
    digest = model_digest(model_dir)
    dataset_hash = meta.get("hash")
    (adapter_dir / "newslora.json").write_text(json.dumps({
        "backend": "torchtune",
        "torchtune_version": TORCHTUNE_VERSION,
        "template": template,
        "instruction": instruction,
        "label_names": label_names,
        "base_model": spec.model,
        "base_model_path": str(model_dir),
        "base_model_digest": digest,
        "dataset_hash": dataset_hash,
        "steps": total_steps,
        "spec": spec.model_dump(mode="json"),
        "created": datetime.now(timezone.utc).isoformat(),
    }, indent=2))
    if not keep_merged:
        for d in run_dir.glob("epoch_*"):
            shutil.rmtree(d)

    metrics = _metrics(history, train_seconds, n_examples=len(encoded))
    ctx.event("torchtune: done", metrics=metrics)
    return {
        "adapter_dir": str(adapter_dir),
        "base_model": spec.model,
        "base_model_digest": digest,
        "template": template,
        "instruction": instruction,
        "label_names": label_names,
        "dataset_hash": dataset_hash,
        "steps": total_steps,
        "metrics": metrics,
        "history": [{k: v for k, v in row.items() if k != "time"} for row in history],
        "resumed_from_step": None,
    }


def _metrics(history: list[dict[str, Any]], train_seconds: float, *, n_examples: int) -> dict[str, Any]:
    rates = [row["tokens_per_s"] for row in history if row.get("tokens_per_s")]
    return {
        "train_loss": history[-1]["loss"],
        "train_loss_first": history[0]["loss"],
        # Steady-state throughput: steps after the first (which also pays for warm-up).
        "tokens_per_s": sum(rates) / len(rates) if rates else None,
        "train_seconds": train_seconds,
        "train_examples": n_examples,
    }
