"""`train_torchtune`: torchtune's `lora_finetune_single_device` recipe behind one function.

    from workers.train.torchtune import train_torchtune
    result = train_torchtune(spec, dataset_dir, out_dir, ctx)     # spec.backend == "torchtune"

The recipe runs as a subprocess in torchtune's isolated environment (`env.py`); this module stays in the
main venv and does everything around it:

1. tokenises the prepared dataset exactly as the PEFT loop does (`workers.modeling.codec.PromptCodec`:
   the model's HF tokenizer, the dataset's template, the article cut to fit, never the label) and
   writes the token ids in the exact order of training (`recipe.py`);
2. writes the recipe's YAML config (`recipe.recipe_config`: the builder and checkpointer from the model
   registry or the checkpoint's config.json);
3. runs `entry.py` with the isolated python, turning its metric lines into progress events (and W&B
   through torchtune's own WandBLogger with spec.wandb) and terminating it on cancel (`process.py`);
4. turns torchtune's PEFT-format adapter into an adapter folder that loads with plain
   `peft.PeftModel.from_pretrained(base, out_dir / "adapter")`, plus `newslora.json` (`convert.py`), and
   scores the validation records with it exactly as the PEFT loop does (val loss and label accuracy).

Resuming: torchtune 0.6 checkpoints only at epoch ends, so the run is cut into chunks of
`spec.save_every` optimizer steps, one recipe "epoch" each (`entry.ChunkSampler` serves epoch e the e-th
chunk of the token file). Each chunk's end leaves a checkpoint (adapter + optimizer + recipe state,
snapshotted atomically under `torchtune/snapshots/`); a job re-delivered after its worker was killed
restores the last one and runs the recipe with `resume_from_checkpoint: true`, so it loses at most the
steps since then, like the PEFT loop. Nothing finer: the recipe cannot checkpoint mid-epoch.

Everything torchtune-specific lives in this package: dropping the backend means deleting it and the
setup script.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from core.context import JobContext
from core.contracts.metrics import MetricsRow, append_metrics, read_metrics, truncate_metrics_after
from core.contracts.train import TrainResult
from core.specs.train import TrainSpec
from workers.modeling.codec import Example, PromptCodec
from workers.modeling.forward import prefix_kv
from workers.modeling.registry import load_tokenizer, model_digest, pick_device, pick_dtype, resolve_model
from workers.modeling.scoring import score_responses
from workers.train.checkpoint import IncompatibleCheckpoint
from workers.train.data import PreparedDataset, load_prepared
from workers.train.result import ResultBuilder
from workers.train.torchtune.convert import export_peft_adapter
from workers.train.torchtune.env import TORCHTUNE_VERSION, torchtune_python
from workers.train.torchtune.process import PID_FILE, TorchtuneRunFailed, run_recipe, wait_for_orphan
from workers.train.torchtune.recipe import (SNAPSHOTS, TorchtuneModel, chunk_steps, lora_modules, plan_steps,
                                            recipe_config, recipe_dtype, run_fingerprint, sample_order,
                                            torchtune_model, wandb_logger_args, write_token_file)

RUN_FILE = "run.json"  # under the run's torchtune/ folder: the fingerprint of the run its checkpoints belong to


def train_torchtune(spec: TrainSpec, dataset_dir: Path, out_dir: Path, ctx: JobContext, *,
                    keep_merged: bool = False) -> TrainResult:
    """LoRA-fine-tune spec.model on a prepared dataset with torchtune's single-device recipe.

    Args:
        spec: the training spec (backend "torchtune"). save_every sets the checkpoint granularity
            (one recipe epoch per save_every steps); eval_every and early_stopping_patience do not
            apply: the recipe runs to its end, then the adapter is scored once on the validation records.
            wandb: W&B through torchtune's WandBLogger, named as the PEFT loop names its run.
        dataset_dir: a prepared dataset (meta.json, train.jsonl, validation.jsonl).
        out_dir: the run's folder: `adapter/` (PEFT adapter + newslora.json), `metrics.jsonl` (one row
            per optimizer step, then the eval row, as the PEFT loop writes it) and `torchtune/` (the
            recipe's config, token file, log and its last chunk's checkpoint under `snapshots/`). A
            folder holding a checkpoint of the same run is resumed from it.
        ctx: progress, events, cancellation.
        keep_merged: keep torchtune's own merged full checkpoint under out_dir/torchtune/epoch_N (for
            checking the exported adapter against it).

    Returns:
        The PEFT loop's `TrainResult` (backend "torchtune"): history holds the one validation after the
        run; resumed_from_step is None, or the step whose checkpoint this run continued from.

    Raises:
        TorchtuneEnvMissing: the isolated environment has not been created.
        JobCancelled: cancelled while training (the subprocess has been terminated).
        TorchtuneRunFailed: the recipe failed (the message holds its log's last lines).
        IncompatibleCheckpoint: out_dir holds a checkpoint of a run with other settings or data.
        DatasetNotPrepared, ModelNotFound, ValueError: bad dataset, model or spec, saying what to change.
    """
    python = torchtune_python()
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    started = time.perf_counter()
    data = load_prepared(dataset_dir)
    model_dir = resolve_model(spec.model)
    device = pick_device(spec.device)
    dtype = recipe_dtype(spec, device)
    lora_modules(spec.lora)  # fail on bad target modules before tokenising
    tt_model = torchtune_model(spec.model, model_dir)  # and on a model torchtune cannot build

    run_dir = out_dir / "torchtune"
    run_dir.mkdir(parents=True, exist_ok=True)
    wait_for_orphan(run_dir / PID_FILE)  # a killed attempt's recipe is gone before its folder is touched
    ctx.check_cancel()

    enc = _encode(spec, data, model_dir, ctx)
    plan = _plan(spec, enc.examples, run_dir)
    config = recipe_config(spec, model_dir=model_dir, run_dir=run_dir, tokens_path=plan.tokens_path,
                           total_steps=plan.total_steps, pad_id=enc.pad_id, device=device, dtype=dtype,
                           keep_merged=keep_merged, wandb=wandb_logger_args(spec, out_dir), tt_model=tt_model)
    resumed_epoch = restore_checkpoint(run_dir, run_fingerprint(config, plan.tokens_path))
    resumed_from_step = None if resumed_epoch is None else (resumed_epoch + 1) * plan.per_chunk
    config["resume_from_checkpoint"] = resumed_from_step is not None
    config_path = run_dir / "torchtune.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    prior_steps = _keep_metrics_upto(out_dir, resumed_from_step or 0)
    _announce(ctx, tt_model, plan, resumed_epoch, n_examples=len(enc.examples), device=device, dtype=dtype)

    t0 = time.perf_counter()
    new_steps = run_recipe(python, config_path, ctx, total_steps=plan.total_steps, step_tokens=plan.step_tokens,
                           log_path=run_dir / "recipe.log",
                           on_step=lambda row: _append_metrics(out_dir, [_metrics_row(row)]))
    recipe_seconds = time.perf_counter() - t0
    steps = prior_steps + new_steps
    if [r["step"] for r in steps] != list(range(1, plan.total_steps + 1)):
        raise TorchtuneRunFailed(f"torchtune logged {len(new_steps)} optimizer steps after step "
                                 f"{resumed_from_step or 0}, {plan.total_steps} in all were planned; see "
                                 f"{run_dir / 'recipe.log'}")

    build = ResultBuilder(spec, data.meta, model_dir=model_dir, model_digest=model_digest(model_dir),
                          backend="torchtune", torchtune_version=TORCHTUNE_VERSION)
    last_epoch = math.ceil(plan.total_steps / plan.per_chunk) - 1
    adapter_dir = export_peft_adapter(run_dir / f"epoch_{last_epoch}", out_dir / "adapter", lora=spec.lora,
                                      base_model_path=model_dir, adapter_meta=build.adapter_meta(plan.total_steps))
    if not keep_merged:
        for d in run_dir.glob("epoch_*"):
            shutil.rmtree(d)

    ctx.check_cancel()
    history: list[dict[str, Any]] = []
    if enc.val_examples:
        row = validate_adapter(model_dir, adapter_dir, enc.val_examples, enc.encoder, spec=spec, device=device,
                               pad_id=enc.pad_id, step=plan.total_steps)
        history.append(row)
        _append_metrics(out_dir, [{"type": "eval", **row}])
        ctx.event(f"eval at step {plan.total_steps}: val_loss {row['val_loss']:.4f}, val_accuracy "
                  f"{row['val_accuracy']:.3f}", metrics=row)

    n_examples = len(enc.examples)
    metrics = _metrics(steps, history, recipe_seconds=recipe_seconds, wall_s=time.perf_counter() - started,
                       n_examples=n_examples, epochs=plan.total_steps * plan.per_step / max(1, n_examples),
                       dtype=dtype, device=device)
    ctx.event("torchtune: done", metrics=metrics)
    return build.result(adapter_dir=adapter_dir, steps=plan.total_steps, total_steps=plan.total_steps,
                        metrics=metrics, history=history, resumed_from_step=resumed_from_step)


@dataclass
class _Encoded:
    encoder: PromptCodec
    examples: list[Example]
    val_examples: list[Example]
    pad_id: int


@dataclass
class _Plan:
    total_steps: int
    per_step: int  # samples an optimizer step consumes (batch_size x grad_accum)
    per_chunk: int  # optimizer steps a recipe epoch (checkpoint granularity)
    tokens_path: Path
    step_tokens: list[int]  # real tokens each optimizer step consumes (padding excluded)


def _encode(spec: TrainSpec, data: PreparedDataset, model_dir: Path, ctx: JobContext) -> _Encoded:
    """The training and validation examples, tokenised as the PEFT loop tokenises them."""
    meta = data.meta
    tokenizer = load_tokenizer(model_dir)
    encoder = PromptCodec.build(tokenizer, template=meta.template, instruction=meta.instruction,
                                label_names=meta.label_names)
    examples = encoder.examples(data.train[:spec.max_train_samples], max_seq_len=spec.max_seq_len,
                                train_on_input=spec.train_on_input)
    val_records = data.validation[:spec.val_samples]
    val_examples = encoder.examples(val_records, max_seq_len=spec.max_seq_len) if val_records else []
    cut = sum(e.truncated for e in examples)
    if cut:
        ctx.event(f"train: {cut} of {len(examples)} articles cut to fit max_seq_len {spec.max_seq_len} "
                  f"(the label and template are kept)", metrics={"split": "train", "truncated": cut})
    return _Encoded(encoder, examples, val_examples, tokenizer.pad_token_id)


def _plan(spec: TrainSpec, examples: list[Example], run_dir: Path) -> _Plan:
    """The run's steps and the token file holding their samples in training order."""
    total_steps = plan_steps(spec, len(examples))
    per_step = spec.batch_size * spec.grad_accum
    order = sample_order([len(e.input_ids) for e in examples], total_steps * per_step,
                         batch_size=spec.batch_size, seed=spec.seed)
    tokens_path = write_token_file(run_dir / "train_tokens.jsonl", examples, order)
    # Real tokens each optimizer step consumes (padding excluded), as the PEFT loop counts them.
    step_tokens = [sum(len(examples[i].input_ids) for i in order[s * per_step:(s + 1) * per_step])
                   for s in range(total_steps)]
    return _Plan(total_steps, per_step, chunk_steps(spec, total_steps), tokens_path, step_tokens)


def _announce(ctx: JobContext, tt_model: TorchtuneModel, plan: _Plan, resumed_epoch: int | None, *,
              n_examples: int, device: str, dtype: str) -> None:
    """The event that says what the recipe starts (a fresh run) or where it continues (a resumed one)."""
    if resumed_epoch is None:
        ctx.event(f"torchtune: starting lora_finetune_single_device ({tt_model.builder}, {tt_model.model_type}, "
                  f"from {tt_model.source})",
                  metrics={"steps": plan.total_steps, "examples": n_examples, "device": device, "dtype": dtype,
                           "builder": tt_model.builder, "checkpoint_every": plan.per_chunk})
    else:
        step = (resumed_epoch + 1) * plan.per_chunk
        ctx.event(f"train: resumed from step {step} of {plan.total_steps} (torchtune checkpoint "
                  f"epoch_{resumed_epoch})", metrics={"resumed_from_step": step})


def restore_checkpoint(run_dir: Path, fingerprint: str) -> int | None:
    """Put the last chunk's checkpoint back where torchtune's resume reads it; the epoch it ended, or None.

    torchtune resumes from `epoch_N/adapter_model.pt` (the largest N) and `recipe_state/recipe_state.pt`
    in its output_dir; both are rebuilt here from `snapshots/epoch_N`, which entry.py wrote
    atomically, so a kill in the middle of torchtune's own save cannot leave a half-written state. With
    no snapshot, the folder is cleared for a fresh run.

    Raises:
        IncompatibleCheckpoint: the snapshot belongs to a run with another config or token file.
    """
    snaps = sorted((int(p.name.split("_", 1)[1]), p) for p in (run_dir / SNAPSHOTS).glob("epoch_*")
                   if p.name.split("_", 1)[1].isdigit() and (p / "recipe_state.pt").is_file()
                   and (p / "adapter_model.pt").is_file())
    run_file = run_dir / RUN_FILE
    saved = json.loads(run_file.read_text()).get("fingerprint") if run_file.is_file() else None
    for stale in [*run_dir.glob("epoch_*"), run_dir / "recipe_state"]:
        shutil.rmtree(stale, ignore_errors=True)
    if not snaps:
        shutil.rmtree(run_dir / SNAPSHOTS, ignore_errors=True)
        run_file.write_text(json.dumps({"fingerprint": fingerprint}))
        return None
    epoch, snap = snaps[-1]
    if saved != fingerprint:
        raise IncompatibleCheckpoint(
            f"cannot resume from {snap}: it was trained with another recipe config or token file (the spec, "
            f"model or dataset changed). Use the same settings, or train into a fresh out_dir")
    (run_dir / f"epoch_{epoch}").mkdir()
    shutil.copy2(snap / "adapter_model.pt", run_dir / f"epoch_{epoch}" / "adapter_model.pt")
    (run_dir / "recipe_state").mkdir()
    shutil.copy2(snap / "recipe_state.pt", run_dir / "recipe_state" / "recipe_state.pt")
    return epoch


def _keep_metrics_upto(out_dir: Path, step: int) -> list[dict[str, Any]]:
    """Keep metrics.jsonl's rows up to `step` (those a resumed run already has); its step rows as dicts."""
    truncate_metrics_after(out_dir, step)
    return [r.model_dump(exclude_none=True) for r in read_metrics(out_dir) if r.type == "step"]


def validate_adapter(model_dir: Path, adapter_dir: Path, examples: list[Example], encoder: PromptCodec, *,
                     spec: TrainSpec, device: str, pad_id: int, step: int, batch_size: int = 16) -> dict[str, Any]:
    """Score the validation examples with the exported adapter loaded by plain PEFT, as the PEFT loop
    scores them (`score_responses`): mean loss per response token (label + EOS) and label-scoring accuracy.

    Returns:
        {"step", "val_loss", "val_accuracy", "val_items", "eval_s"}
    """
    # lazy: peft and transformers take seconds to import (as in the PEFT loop)
    from peft import PeftModel
    from peft.helpers import disable_input_dtype_casting
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    dtype = pick_dtype(spec.dtype if spec.dtype != "fp16" else "auto", device)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = PeftModel.from_pretrained(base, adapter_dir).to(device).eval()
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        if dtype != torch.float32:
            # As the PEFT loop computes: LoRA matmuls in the base's dtype under autocast, instead of
            # PEFT's default of casting every adapted layer's input up to fp32 and back.
            stack.enter_context(disable_input_dtype_casting(model))
            stack.enter_context(torch.autocast(torch.device(device).type, dtype=dtype))
        kv = prefix_kv(model, encoder.prefix_ids)
        scores = score_responses(model, encoder, examples, kv, pad_id=pad_id, batch_size=batch_size)
    return {"step": step, "val_loss": round(scores.loss, 5),
            "val_accuracy": round(scores.accuracy, 5),
            "val_items": len(examples), "eval_s": round(time.perf_counter() - started, 2)}


def _metrics_row(row: dict[str, Any]) -> dict[str, Any]:
    """A per-step row of metrics.jsonl, in the PEFT loop's layout."""
    out = {"step": row["step"], "loss": round(row["loss"], 5), "lr": row["lr"], "tokens": row.get("tokens")}
    if row.get("tokens_per_s"):
        out["tokens_per_s"] = round(row["tokens_per_s"], 1)
    return out


def _append_metrics(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    append_metrics(out_dir, [MetricsRow.model_validate(r) for r in rows])


def _metrics(steps: list[dict[str, Any]], history: list[dict[str, Any]], *, recipe_seconds: float,
             wall_s: float, n_examples: int, epochs: float, dtype: str, device: str) -> dict[str, Any]:
    last = history[-1] if history else {}
    recent = [r["loss"] for r in steps[-10:]]
    rate = steady_tokens_per_s(steps)
    return {
        "train_loss": sum(recent) / len(recent),  # mean of the last 10 steps, as the PEFT loop reports it
        "train_loss_first": steps[0]["loss"],
        "val_loss": last.get("val_loss"),
        "val_accuracy": last.get("val_accuracy"),
        "best_val_loss": last.get("val_loss"),
        "tokens": sum(r.get("tokens") or 0 for r in steps),
        "train_s": round(recipe_seconds, 2),  # the whole subprocess: startup, load, steps, save
        "tokens_per_s": round(rate, 1) if rate else None,  # steady state: the steps after the first
        "wall_s": round(wall_s, 2),
        "examples": n_examples,
        "epochs": round(epochs, 4),
        "dtype": dtype,
        "device": device,
        "stop_reason": "completed",
    }


def steady_tokens_per_s(history: list[dict[str, Any]]) -> float | None:
    """Input tokens (padding excluded) per second over the optimizer steps after the first, which also
    pays for warm-up; None with fewer than two steps."""
    timed = [r for r in history if r.get("time") is not None and r.get("tokens")]
    if len(timed) < 2 or timed[-1]["time"] <= timed[0]["time"]:
        return None
    return sum(r["tokens"] for r in timed[1:]) / (timed[-1]["time"] - timed[0]["time"])
