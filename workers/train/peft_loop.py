"""LoRA fine-tuning with PEFT in a plain PyTorch loop, made fast for a small CPU.

Where the time goes and what this loop does about it:
- Frozen base weights in bf16 where the hardware multiplies bf16 natively (AVX512-BF16/AMX CPUs, CUDA);
  LoRA weights and the optimizer state stay fp32, cast to bf16 inside `torch.autocast` for the matmuls.
- The shared prompt prefix (template header + instruction, about half of each AG News prompt) runs once
  per batch; every row attends to its keys/values (see `workers/train/data.py`). Same loss, fewer tokens.
- The LM head (vocabulary x hidden, a fifth of a 135M model's FLOPs per token) runs only at the positions
  that have a target: with train_on_input off, the label and EOS tokens.
- Length-bucketed batches, so little compute goes to padding.
- Eager attention on CPU (faster than SDPA's CPU flash kernel for short masked sequences).
- On a CPU Llama with one dropout-free adapter, the forward is `workers/modeling/lora_forward.py`'s (packed
  q|k|v and gate|up, stacked LoRA A and block-diagonal B, prefix and rows as one token matrix); validation
  scores the adapter merged aside in the lean scoring forward, as a classify job does.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from core.atomic import atomic_dir
from core.context import JobCancelled, JobContext
from core.contracts.metrics import METRICS_FILE, MetricsRow, append_metrics, truncate_metrics_after
from core.contracts.train import TrainResult
from core.settings import get_settings
from core.specs.train import TrainSpec
from workers.modeling.codec import IGNORE, Example, PromptCodec
from workers.modeling.forward import decoder_of, lm_head_of, prefix_kv, shared_prefix_hidden
from workers.modeling.lora_forward import frozen_layers, lora_forward_ok, lora_shared_prefix_hidden, merged_weights
from workers.modeling.registry import load_tokenizer, model_digest, pick_device, pick_dtype, resolve_model
from workers.modeling.scoring import FrozenStreams, ResponseScores, score_responses
from workers.train.budget import FINAL_SAVE_S, PROBE_STEPS, out_of_time, planned_steps
from workers.train.checkpoint import (check_compatible, latest_checkpoint, load_checkpoint,
                                      restore_rng_states, rng_states, save_checkpoint)
from workers.train.data import PreparedDataset, TrainBatch, collate_train, length_bucketed_batches, load_prepared
from workers.train.frozen_cache import FrozenCache, build_frozen_cache, frozen_cache_bytes
from workers.train.result import ResultBuilder


class UnknownTargetModules(ValueError):
    """LoRA targets (modules or layers) that the model does not have."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class TrainOutOfMemory(RuntimeError):
    """A training step ran out of memory."""


# ---------------------------------------------------------------------------------------------------
# The training loss (the forward passes and label scoring live in workers/modeling/)
# ---------------------------------------------------------------------------------------------------

def batch_loss(model: Any, batch: TrainBatch, *, lean: bool = False,
               frozen: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Summed cross-entropy over the batch's targets, the LM head applied only where there is a target.

    lean: run `lora_forward.lora_shared_prefix_hidden` (the caller checked `lora_forward_ok(model)`).
    frozen: (k, stream) to start that forward at layer k (`FrozenCache.stream`; lean only).
    """
    if lean:
        prefix_h, h = lora_shared_prefix_hidden(model, batch.prefix_ids, batch.input_ids, batch.attention_mask,
                                                frozen=frozen)
    else:
        prefix_h, h, _ = shared_prefix_hidden(model, batch.prefix_ids, batch.input_ids, batch.attention_mask)
    keep = batch.targets != IGNORE  # (B, S)
    hidden, targets = h[keep], batch.targets[keep]  # (N, H), (N,)
    if batch.prefix_targets is not None:  # train_on_input: the prefix's targets, counted once per row
        pkeep = batch.prefix_targets != IGNORE  # (B, P)
        hidden = torch.cat([prefix_h.expand(len(pkeep), -1, -1)[pkeep], hidden])
        targets = torch.cat([batch.prefix_targets[pkeep], targets])
    logits = lm_head_of(model)(hidden).float()  # (N, V)
    return F.cross_entropy(logits, targets, reduction="sum")


# ---------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------

class PeftLoraTrainer:
    """LoRA fine-tuning of a causal LM on a prepared dataset, resumable from its own checkpoints.

    Call `setup()`, then `train()` (returns the `TrainResult`), then `cleanup()`.
    """

    def __init__(self, spec: TrainSpec, dataset_dir: Path, out_dir: Path, ctx: JobContext) -> None:
        self.spec = spec
        self.dataset_dir = Path(dataset_dir)
        self.out_dir = Path(out_dir)
        self.ctx = ctx
        self.step = 0  # optimizer steps done
        self.total_steps = 0
        self.micro_per_epoch = 0
        self.tokens_seen = 0
        self.train_seconds = 0.0  # summed over resumed sessions
        self.best_val_loss = math.inf
        self.best_watched = math.inf  # the early-stopping metric's best, as a loss (see _validate)
        self.bad_evals = 0
        self.last_saved_step = -1
        self.last_eval_step = -1
        self.stop_reason: str | None = None
        self.resumed_from_step: int | None = None
        self.history: list[dict[str, Any]] = []
        self.recent_losses: deque[float] = deque(maxlen=10)
        self._orders: dict[int, list[list[int]]] = {}
        self._session_start = time.perf_counter()
        self._session_steps = 0
        self.wandb: Any = None
        # train.max_minutes: the budget's clock runs from here (model loading included), across resumed sessions
        self.budget_s = spec.max_minutes * 60 if spec.max_minutes else None
        self.budget_used_before = 0.0  # wall seconds of earlier sessions
        self.planned = False  # the schedule's length fitted to the budget (after the first steps)
        self.val_s = 0.0  # the last validation's seconds
        self.session_step_times: list[float] = []
        # train.keep_best: the trainable weights of the best validation so far, and its step
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.best_step: int | None = None
        # the frozen bottom layers' output per example (lora.top_layers, lean forward): built as training starts
        self.frozen: FrozenCache | None = None

    # -- setup ------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Read the data, load and wrap the model, build the optimizer; resume from a checkpoint if any.

        Raises:
            DatasetNotPrepared, ModelNotFound, UnknownTargetModules, IncompatibleCheckpoint, ValueError.
        """
        self._seed_everything(self.spec.seed)
        self.data = self._setup_data()
        self.device = self._setup_device()
        self.model_dir = self._setup_model_dir()
        self.build = self._setup_result_builder()
        self.tokenizer = self._setup_tokenizer()
        self.encoder = self._setup_encoder()
        self.train_examples = self._setup_examples(self.data.train[:self.spec.max_train_samples], "train")
        self.val_examples = self._setup_examples(self.data.validation[:self.spec.val_samples], "validation")
        self.total_steps = self._setup_total_steps()
        self.model = self._setup_model()
        # The lean LoRA forward where it computes what PEFT computes (a CPU Llama, one adapter, no dropout)
        self.lean = self.spec.lean_forward and lora_forward_ok(self.model)
        # the bottom layers without LoRA (lean forward, frozen_cache_gb > 0): their output is kept, for the
        # training articles as training starts (`_setup_frozen_cache`) and for the validation articles here
        self.n_frozen = frozen_layers(self.model) if self.lean and self.spec.frozen_cache_gb else 0
        self.val_frozen = FrozenStreams(self.n_frozen) if self.n_frozen else None
        self.optimizer = self._setup_optimizer()
        self.scheduler = self._setup_scheduler()
        self.wandb = self._setup_wandb()
        self._maybe_resume()

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _setup_data(self) -> PreparedDataset:
        return load_prepared(self.dataset_dir)

    def _setup_device(self) -> torch.device:
        return torch.device(pick_device(self.spec.device))

    def _setup_model_dir(self) -> Path:
        path = resolve_model(self.spec.model)  # ModelNotFound says what to do
        self.model_digest = model_digest(path)
        return path

    def _setup_result_builder(self) -> ResultBuilder:
        return ResultBuilder(self.spec, self.data.meta, model_dir=self.model_dir, model_digest=self.model_digest,
                             backend="peft")

    def _setup_tokenizer(self) -> Any:
        return load_tokenizer(self.model_dir)

    def _setup_encoder(self) -> PromptCodec:
        meta = self.data.meta
        return PromptCodec.build(self.tokenizer, template=meta.template, instruction=meta.instruction,
                                 label_names=meta.label_names)

    def _setup_examples(self, records: list[dict[str, Any]], split: str) -> list[Example]:
        examples = self.encoder.examples(records, max_seq_len=self.spec.max_seq_len,
                                         train_on_input=self.spec.train_on_input)
        cut = sum(e.truncated for e in examples)
        if cut:
            self.ctx.event(f"{split}: {cut} of {len(examples)} articles cut to fit max_seq_len "
                           f"{self.spec.max_seq_len} (the label and template are kept)",
                           metrics={"split": split, "truncated": cut})
        return examples

    def _setup_total_steps(self) -> int:
        self.micro_per_epoch = math.ceil(len(self.train_examples) / self.spec.batch_size)
        if self.spec.max_steps:
            return self.spec.max_steps
        return max(1, math.ceil(self.spec.epochs * self.micro_per_epoch / self.spec.grad_accum))

    def _setup_model(self) -> Any:
        # lazy: peft and transformers take seconds to import; only a training process needs them
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        self.dtype = pick_dtype(self.spec.dtype, self.device.type)
        # On CPU the plain matmul-softmax attention beats SDPA's flash kernel at these short, masked
        # sequences (its backward especially): measured 612 vs 498 tokens/s on SmolLM2, 2 cores.
        attn = "eager" if self.device.type == "cpu" else None
        base = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=self.dtype, attn_implementation=attn)
        targets = self._target_modules(base)
        lora = self.spec.lora
        config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                            layers_to_transform=self._adapted_layers(base), task_type="CAUSAL_LM")
        model = get_peft_model(base, config)  # LoRA weights in fp32 (autocast_adapter_dtype)
        model.to(self.device)
        model.train()
        return model

    def _adapted_layers(self, base: Any) -> list[int] | None:
        """The decoder layers `lora.top_layers` names (the top N), or None for all."""
        try:
            return self.spec.lora.adapted_layers(len(base.get_decoder().layers))
        except ValueError as e:
            raise UnknownTargetModules(f"{e} ({self.spec.model})") from None

    def _target_modules(self, base: Any) -> list[str] | str:
        wanted = self.spec.lora.target_modules
        if wanted == ["all-linear"]:
            return "all-linear"
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in base.named_modules()
                         if isinstance(m, torch.nn.Linear) and name != "lm_head"})
        unknown = [t for t in wanted if t not in linear]
        if unknown:
            raise UnknownTargetModules(
                f"LoRA target modules {unknown} are not linear layers of {self.spec.model}: its linear modules "
                f"are {', '.join(linear)} (or use ['all-linear'])")
        return list(wanted)

    def _setup_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.spec.learning_rate, weight_decay=self.spec.weight_decay)

    def _setup_scheduler(self) -> torch.optim.lr_scheduler.LambdaLR:
        warmup = self.spec.warmup_steps

        def factor(step: int) -> float:  # linear warm-up, then cosine decay to zero at total_steps
            if step < warmup:
                return (step + 1) / warmup
            # total_steps read at each step: a time budget fits it to the machine after the first steps
            progress = (step - warmup) / max(1, self.total_steps - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

    def _setup_wandb(self) -> Any:
        if not self.spec.wandb:
            return None
        try:
            import wandb  # lazy: optional, and only runs with `wandb: true` use it
        except ImportError:
            self.ctx.event("wandb is not installed: metrics go to metrics.jsonl only (pip install wandb)",
                           level="warning")
            return None
        # Offline unless WANDB_MODE says otherwise (Settings.wandb_mode): a run syncs only where asked to.
        return wandb.init(project="newslora", dir=str(self.out_dir), config=self.spec.model_dump(mode="json"),
                          id=f"train-{uuid.uuid5(uuid.NAMESPACE_URL, str(self.out_dir.resolve())).hex[:12]}",
                          resume="allow", mode=get_settings().wandb_mode)

    def _fingerprint(self) -> dict[str, Any]:
        s = self.spec
        return {"model_digest": self.model_digest, "dataset_hash": self.data.meta.hash,
                "lora": s.lora.model_dump(mode="json"), "batch_size": s.batch_size, "grad_accum": s.grad_accum,
                "seed": s.seed, "max_seq_len": s.max_seq_len, "train_on_input": s.train_on_input,
                "max_train_samples": s.max_train_samples, "learning_rate": s.learning_rate,
                "warmup_steps": s.warmup_steps,
                # with a time budget the length is planned at run time (and restored from the checkpoint)
                "total_steps": f"max_minutes={s.max_minutes}" if self.budget_s else self.total_steps,
                "keep_best": s.keep_best}

    def _maybe_resume(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        ckpt = latest_checkpoint(self.out_dir)
        if ckpt is None:
            (self.out_dir / METRICS_FILE).unlink(missing_ok=True)
            return
        state = load_checkpoint(ckpt, self.model)
        check_compatible(state["fingerprint"], self._fingerprint(), ckpt)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        restore_rng_states(state["rng"])
        self.step = self.last_saved_step = self.resumed_from_step = state["step"]
        self.tokens_seen, self.train_seconds = state["tokens_seen"], state["train_seconds"]
        self.best_val_loss, self.bad_evals = state["best_val_loss"], state["bad_evals"]
        self.best_watched = state.get("best_watched", self.best_val_loss)
        self.history, self.stop_reason = state["history"], state["stop_reason"]
        self.last_eval_step = self.history[-1]["step"] if self.history else -1
        self.recent_losses.extend(state["recent_losses"])
        self.best_weights, self.best_step = state.get("best_weights"), state.get("best_step")
        if self.budget_s:
            self.budget_used_before = state.get("budget_used_s", 0.0)
            self.planned, self.val_s = state.get("planned", False), state.get("val_s", 0.0)
            if self.planned:
                self.total_steps = state["total_steps"]
        truncate_metrics_after(self.out_dir, self.step)
        self.ctx.event(f"train: resumed from step {self.step} of {self.total_steps} ({ckpt.name})",
                       metrics={"resumed_from_step": self.step})

    # -- the loop ---------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        """Run to total_steps (or early stop), checkpointing and validating on the way.

        Raises:
            JobCancelled: after saving a checkpoint. TrainingDiverged, TrainOutOfMemory.
        """
        self.ctx.event(f"train: {len(self.train_examples)} examples, {self.total_steps} steps of "
                       f"{self.spec.batch_size}x{self.spec.grad_accum}, {self.dtype} on {self.device}",
                       metrics={"total_steps": self.total_steps, "examples": len(self.train_examples)})
        self.frozen = self._setup_frozen_cache()
        while self.step < self.total_steps and self.stop_reason is None:
            self._check_cancel()
            started = time.perf_counter()
            loss, tokens = self._train_step()
            self.step += 1
            seconds = time.perf_counter() - started
            self._log_metrics(loss, tokens, seconds)
            self._keep_time(seconds)
            self._maybe_validate()
            self._maybe_checkpoint()
        if self.last_eval_step != self.step:
            self._validate()
        if self.last_saved_step != self.step:
            self._save()
        return self._export()

    # -- the time budget (train.max_minutes) ------------------------------------------------------------

    def _budget_elapsed(self) -> float:
        return self.budget_used_before + time.perf_counter() - self._session_start

    def _step_s(self) -> float:
        """Seconds an optimizer step takes now: the mean of this session's last 50 (its first left out)."""
        times = self.session_step_times[1:][-50:] or self.session_step_times
        return sum(times) / len(times)

    def _keep_time(self, seconds: float) -> None:
        """Plan the schedule once the first steps are measured (one validation timed with them); stop where
        one more step would end past the budget."""
        if self.budget_s is None:
            return
        self.session_step_times.append(seconds)
        if not self.planned:
            if len(self.session_step_times) >= PROBE_STEPS:
                if self.val_examples and self.last_eval_step != self.step:
                    self._validate()  # its time is part of the plan (and a point of the learning curve)
                self._plan()
        elif self.step < self.total_steps and out_of_time(budget_s=self.budget_s, elapsed_s=self._budget_elapsed(),
                                                          step_s=self._step_s(), final_s=FINAL_SAVE_S):
            self.stop_reason = "time_budget"
            self.ctx.event(f"time budget: stopping at step {self.step} of {self.total_steps} "
                           f"({self._budget_elapsed():.0f} s of {self.budget_s:.0f} s used)",
                           metrics={"step": self.step})

    def _plan(self) -> None:
        """Fit total_steps (the cosine schedule's length) to what is left of the budget."""
        first = not self.planned
        before = self.total_steps
        self.total_steps = max(self.step + 1, planned_steps(
            budget_s=self.budget_s, elapsed_s=self._budget_elapsed(), step=self.step, step_s=self._step_s(),
            val_s=self.val_s, eval_every=self.spec.eval_every, final_s=FINAL_SAVE_S, cap=self.spec.max_steps))
        self.planned = True
        if first or abs(self.total_steps - before) > 0.01 * before:
            epochs = self.total_steps * self.spec.grad_accum / max(1, self.micro_per_epoch)
            self.ctx.event(f"time budget {self.spec.max_minutes:g} min: {'planned' if first else 'revised to'} "
                           f"{self.total_steps} steps ({epochs:.2f} epochs) at {self._step_s():.2f} s a step, "
                           f"a {self.val_s:.1f} s validation every {self.spec.eval_every} steps; "
                           f"{self._budget_elapsed():.0f} s used",
                           metrics={"total_steps": self.total_steps, "step_s": round(self._step_s(), 3),
                                    "val_s": round(self.val_s, 2)})

    def _budget_summary(self) -> dict[str, Any] | None:
        if self.budget_s is None:
            return None
        return {"max_minutes": self.spec.max_minutes, "planned_steps": self.total_steps,
                "step_s": round(self._step_s(), 3) if self.session_step_times else 0.0,
                "val_s": round(self.val_s, 2), "validations": len(self.history),
                "used_s": round(self._budget_elapsed(), 1)}

    def _check_cancel(self) -> None:
        try:
            self.ctx.check_cancel()
        except JobCancelled:
            if self.last_saved_step != self.step:
                self._save()
            self.ctx.event(f"train: cancelled at step {self.step}; checkpoint saved, run again to resume",
                           level="warning", metrics={"step": self.step})
            raise

    def _setup_frozen_cache(self) -> FrozenCache | None:
        """With LoRA on the top layers only (and the lean forward), the layers below run once an example here
        and never again (`frozen_cache`); None where there is nothing to skip or it would take more memory than
        `frozen_cache_gb`."""
        layers = self.n_frozen
        if not layers:
            return None
        hidden = decoder_of(self.model).config.hidden_size
        need = frozen_cache_bytes(self.train_examples, hidden, self.dtype)
        if need > self.spec.frozen_cache_gb * 2**30:
            self.ctx.event(f"train: the {layers} frozen bottom layers run every step: keeping their output would "
                           f"take {need / 2**30:.1f} GiB, over frozen_cache_gb={self.spec.frozen_cache_gb:g}",
                           metrics={"frozen_cache_gib": round(need / 2**30, 2)})
            return None
        n, shown = len(self.train_examples), [0]

        def progress(done: int, of: int, seconds: float) -> None:
            self._check_cancel()  # minutes of work on a slow machine: a cancel is heard between batches
            if done == of or done >= shown[0] + of // 10:  # about every tenth of the examples
                shown[0] = done
                self.ctx.progress(done, of, message=f"frozen layers 0-{layers - 1}: {done} of {of} articles, "
                                                      f"{seconds:.0f} s")

        started = time.perf_counter()
        cache = build_frozen_cache(self.model, self.train_examples, layers, pad_id=self.tokenizer.pad_token_id,
                                   batch_size=max(32, self.spec.batch_size), compute=self._compute, progress=progress)
        seconds = time.perf_counter() - started
        self.ctx.event(f"train: layers 0-{layers - 1} hold no LoRA weight: their output for the {n} articles kept "
                       f"({cache.nbytes() / 2**20:.0f} MiB, {seconds:.1f} s); each step runs the top "
                       f"{len(decoder_of(self.model).layers) - layers} layers",
                       metrics={"frozen_layers": layers, "frozen_cache_mib": round(cache.nbytes() / 2**20, 1),
                                "frozen_cache_s": round(seconds, 2)})
        return cache

    def _micro_batches(self) -> Iterator[TrainBatch]:
        """The micro-batches of the next optimizer step, from the seeded, length-bucketed epoch order."""
        lengths = [len(e.input_ids) for e in self.train_examples]
        for k in range(self.step * self.spec.grad_accum, (self.step + 1) * self.spec.grad_accum):
            epoch, pos = divmod(k, self.micro_per_epoch)
            if epoch not in self._orders:
                self._orders = {epoch: length_bucketed_batches(lengths, self.spec.batch_size, seed=self.spec.seed,
                                                               epoch=epoch)}
            idx = self._orders[epoch][pos]
            batch = collate_train([self.train_examples[i] for i in idx], self.tokenizer.pad_token_id)
            batch.rows = idx
            yield self._to_device(batch)

    def _to_device(self, batch: Any) -> Any:
        for name, value in vars(batch).items():
            if isinstance(value, torch.Tensor):
                setattr(batch, name, value.to(self.device, non_blocking=True))
        return batch

    def _compute(self) -> contextlib.AbstractContextManager:
        """bf16/fp16 base: LoRA matmuls in the base's dtype via autocast (fp32 master weights) instead of
        PEFT's default of casting every activation up to fp32 and back."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        from peft.helpers import disable_input_dtype_casting  # lazy: peft as in _setup_model
        stack = contextlib.ExitStack()
        stack.enter_context(disable_input_dtype_casting(self.model))
        stack.enter_context(torch.autocast(self.device.type, dtype=self.dtype))
        return stack

    def _train_step(self) -> tuple[float, int]:
        """One optimizer step over grad_accum micro-batches. Returns (mean loss per target token, tokens)."""
        batches = list(self._micro_batches())
        n_targets = sum(b.n_targets for b in batches)
        loss_sum, tokens = 0.0, 0
        try:
            for batch in batches:
                with self._compute():
                    frozen = self.frozen.stream(batch, batch.rows) if self.frozen is not None else None
                    loss = batch_loss(self.model, batch, lean=self.lean, frozen=frozen)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss is {loss.item()} at step {self.step + 1}: the run diverged; lower the learning "
                        f"rate (now {self.spec.learning_rate:g}, try {self.spec.learning_rate / 4:g}) and train "
                        f"into a fresh out_dir")
                (loss / n_targets).backward()
                loss_sum += loss.item()
                tokens += batch.n_tokens
            if self.spec.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], self.spec.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if isinstance(e, TrainingDiverged) or not _is_oom(e):
                raise
            raise TrainOutOfMemory(
                f"out of memory at step {self.step + 1} (batch_size {self.spec.batch_size}, max_seq_len "
                f"{self.spec.max_seq_len}): lower batch_size (raise grad_accum to keep the effective batch) or "
                f"max_seq_len") from e
        finally:
            self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / max(1, n_targets), tokens

    def _log_metrics(self, loss: float, tokens: int, seconds: float) -> None:
        self.tokens_seen += tokens
        self.train_seconds += seconds
        self._session_steps += 1
        self.recent_losses.append(loss)
        lr = self.scheduler.get_last_lr()[0]
        elapsed = time.perf_counter() - self._session_start
        eta = elapsed / self._session_steps * (self.total_steps - self.step)
        row = {"step": self.step, "loss": round(loss, 5), "lr": lr, "tokens": tokens,
               "tokens_per_s": round(tokens / seconds, 1), "step_s": round(seconds, 3),
               "train_s": round(self.train_seconds, 2)}
        self._append_metrics(MetricsRow(type="step", **row))
        self.ctx.progress(self.step, self.total_steps, loss=row["loss"], lr=lr, tokens_per_s=row["tokens_per_s"],
                          eta_s=round(eta, 1))

    def _append_metrics(self, row: MetricsRow) -> None:
        append_metrics(self.out_dir, [row])
        if self.wandb is not None:
            self.wandb.log(row.model_dump(exclude={"step", "format_version", "type"}, exclude_none=True),
                           step=row.step)

    def _maybe_validate(self) -> None:
        if self.step % self.spec.eval_every == 0 and self.step < self.total_steps:
            self._validate()
            if self.planned:
                self._plan()  # the machine's speed moves: fit what is left again

    def _ties_best_with_lower_loss(self, watched: float, val_loss: float) -> bool:
        """keep_best on val_accuracy: a validation that ties the best one's accuracy with a lower loss is the
        better model (233 articles move accuracy in steps of 0.43 points, so ties are common: a run of
        2026-12-06 scored 93.1% at step 500 and again at step 700, with val loss 0.0835 and 0.0811, and kept
        step 500's weights). Early stopping's patience still counts only a gain of the watched metric."""
        if self.best_step is None or abs(watched - self.best_watched) > 1e-4:
            return False
        best = next((h for h in self.history if h["step"] == self.best_step), None)
        return best is not None and val_loss < best["val_loss"]

    def _validate(self) -> None:
        if not self.val_examples:
            return
        started = time.perf_counter()
        val_loss, accuracy = self.evaluate(self.val_examples, frozen=self.val_frozen)
        self.val_s = time.perf_counter() - started
        row = {"step": self.step, "val_loss": round(val_loss, 5), "val_accuracy": round(accuracy, 5),
               "val_items": len(self.val_examples), "eval_s": round(time.perf_counter() - started, 2),
               # time to accuracy: training seconds so far (optimizer steps over all resumed sessions,
               # validation excluded) and this session's wall time (validation and checkpoints included)
               "train_s": round(self.train_seconds, 2),
               "wall_s": round(time.perf_counter() - self._session_start, 2)}
        self.history.append(row)
        self.last_eval_step = self.step
        self._append_metrics(MetricsRow(type="eval", **row))
        self.ctx.event(f"eval at step {self.step}: val_loss {val_loss:.4f}, val_accuracy {accuracy:.3f}", metrics=row)
        self.best_val_loss = min(self.best_val_loss, val_loss)
        # Early stopping watches one metric, as a loss (lower is better): val_loss, or 1 - val_accuracy.
        watched = val_loss if self.spec.early_stopping_metric == "val_loss" else 1.0 - accuracy
        gained = watched < self.best_watched - 1e-4
        if self.spec.keep_best and (gained or self._ties_best_with_lower_loss(watched, row["val_loss"])):
            # the trainable (LoRA) weights only: a few MB
            self.best_weights = {n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters()
                                 if p.requires_grad}
            self.best_step = self.step
        if gained:
            self.best_watched, self.bad_evals = watched, 0
        else:
            self.bad_evals += 1
            patience = self.spec.early_stopping_patience
            if patience and self.bad_evals >= patience and self.step < self.total_steps:
                self.stop_reason = "early_stopping"
                what = "val-loss" if self.spec.early_stopping_metric == "val_loss" else "val-accuracy"
                self.ctx.event(f"early stopping at step {self.step}: no {what} gain in {patience} evals",
                               metrics={"step": self.step})

    @torch.no_grad()
    def evaluate(self, examples: Sequence[Example], batch_size: int = 16,
                 frozen: FrozenStreams | None = None) -> tuple[float, float]:
        """(mean loss per response token (label + EOS), label-scoring accuracy) over examples, from one
        scoring forward (`score_responses`): the classifier's own scoring, so validation accuracy is a
        classify job's accuracy. `frozen`: where the layers below the adapted ones keep their output for
        these examples (the validation set, scored again at every validation)."""
        scores = self._score(examples, batch_size, frozen)
        return scores.loss, scores.accuracy

    @torch.no_grad()
    def predict(self, examples: Sequence[Example], batch_size: int = 16) -> list[int]:
        """The label index each example's prompt scores highest (`score_responses`)."""
        return self._score(examples, batch_size).predicted

    def _score(self, examples: Sequence[Example], batch_size: int,
               frozen: FrozenStreams | None = None) -> ResponseScores:
        was_training = self.model.training
        self.model.eval()
        try:
            with self._compute():
                kv = prefix_kv(self.model, self.encoder.prefix_ids)
                # With the lean forward: score on the weights merged aside, as a classify job scores a merged
                # adapter, in its lean forward (several times faster than PEFT's layers here)
                weights = merged_weights(self.model) if self.lean else None
                return score_responses(self.model, self.encoder, examples, kv, weights=weights,
                                       batch_size=batch_size, frozen=frozen if self.lean else None)
        finally:
            self.model.train(was_training)

    def _maybe_checkpoint(self) -> None:
        if self.step % self.spec.save_every == 0:
            self._save()

    def _save(self) -> None:
        state = {"step": self.step, "micro_batch": self.step * self.spec.grad_accum,
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "rng": rng_states(), "tokens_seen": self.tokens_seen, "train_seconds": self.train_seconds,
                 "best_val_loss": self.best_val_loss, "best_watched": self.best_watched,
                 "bad_evals": self.bad_evals, "history": self.history,
                 "stop_reason": self.stop_reason, "recent_losses": list(self.recent_losses),
                 "best_weights": self.best_weights, "best_step": self.best_step,
                 "budget_used_s": self._budget_elapsed(), "planned": self.planned, "val_s": self.val_s,
                 "total_steps": self.total_steps, "fingerprint": self._fingerprint()}
        save_checkpoint(self.out_dir, self.step, model=self.model, state=state,
                        spec_json=self.build.adapter_meta(self.step).model_dump(mode="json"))
        self.last_saved_step = self.step

    # -- the result -------------------------------------------------------------------------------

    def _export(self) -> TrainResult:
        """Write the final adapter (temp folder, then rename) and build the result."""
        adapter_dir = self.out_dir / "adapter"
        budget = self._budget_summary()  # before export: the budget covers training, not the saving
        last_eval = self.history[-1] if self.history else {}
        best = self._restore_best()
        if best is not None:
            last_eval = best
        with atomic_dir(adapter_dir) as tmp:
            self.model.save_pretrained(tmp)
            self.build.write_adapter_meta(tmp, self.step)
        metrics = {"train_loss": (sum(self.recent_losses) / len(self.recent_losses)) if self.recent_losses else None,
                   "val_loss": last_eval.get("val_loss"), "val_accuracy": last_eval.get("val_accuracy"),
                   "best_val_loss": self.best_val_loss if math.isfinite(self.best_val_loss) else None,
                   "tokens": self.tokens_seen, "train_s": round(self.train_seconds, 2),
                   "tokens_per_s": round(self.tokens_seen / self.train_seconds, 1) if self.train_seconds else None,
                   "wall_s": round(time.perf_counter() - self._session_start, 2),
                   "examples": len(self.train_examples),
                   "epochs": round(self.step * self.spec.grad_accum / self.micro_per_epoch, 4),
                   "dtype": str(self.dtype).removeprefix("torch."), "device": str(self.device),
                   "stop_reason": self.stop_reason or "completed",
                   "best_step": best["step"] if best is not None else None, "budget": budget}
        return self.build.result(adapter_dir=adapter_dir, steps=self.step, total_steps=self.total_steps,
                                 metrics=metrics, history=self.history, resumed_from_step=self.resumed_from_step)

    def _restore_best(self) -> dict[str, Any] | None:
        """keep_best: put the best validation's weights back (if it was not the last); return its history row."""
        if not self.spec.keep_best or self.best_step is None or self.best_weights is None:
            return None
        row = next((h for h in self.history if h["step"] == self.best_step), None)
        if self.best_step != (self.history[-1]["step"] if self.history else None):
            with torch.no_grad():
                params = dict(self.model.named_parameters())
                for name, value in self.best_weights.items():
                    params[name].copy_(value)
            self.ctx.event(f"keep_best: exporting step {self.best_step}'s weights (val_accuracy "
                           f"{row['val_accuracy']:.3f}) instead of step {self.step}'s "
                           f"({self.history[-1]['val_accuracy']:.3f})", metrics={"best_step": self.best_step})
        return row

    def cleanup(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    text = str(e).lower()
    return "out of memory" in text or "can't allocate memory" in text or "cannot allocate memory" in text
