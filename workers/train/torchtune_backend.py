"""The torchtune training backend: torchtune's `lora_finetune_single_device` recipe behind one function.

    from workers.train.torchtune_backend import train_torchtune
    result = train_torchtune(spec, dataset_dir, out_dir, ctx)     # spec.backend == "torchtune"

torchtune 0.6.1 (its last release) needs torchao <= 0.13, which PEFT 0.21 refuses, so torchtune lives
in its own environment (`bash scripts/setup_torchtune_env.sh` -> `.venv-torchtune`) and the recipe runs
there as a subprocess. This module stays in the main venv and does everything around the recipe:

1. tokenises the prepared dataset exactly as the PEFT loop does (`workers.modeling.codec.PromptCodec`:
   the model's HF tokenizer, the dataset's template, the article cut to fit, never the label) and
   writes the token ids in the exact order of training;
2. writes the recipe's YAML config: the model builder and the checkpointer's model type come from
   the model's registry entry (`torchtune_builder`, `torchtune_model_type` in configs/models/*.yaml),
   or, for a local checkpoint folder, from its config.json (`torchtune_model`);
3. runs `workers/train/torchtune_entry.py` with the isolated python, turning its metric lines into
   progress events (and W&B through torchtune's own WandBLogger with spec.wandb) and terminating it
   on cancel;
4. turns torchtune's PEFT-format adapter into an adapter folder that loads with plain
   `peft.PeftModel.from_pretrained(base, out_dir / "adapter")`, plus `newslora.json`, and scores the
   validation records with it exactly as the PEFT loop does (val loss and label accuracy).

Resuming: torchtune 0.6 checkpoints only at epoch ends, so the run is cut into chunks of
`spec.save_every` optimizer steps, one recipe "epoch" each (`torchtune_entry.ChunkSampler` serves
epoch e the e-th chunk of the token file). Each chunk's end leaves a checkpoint (adapter + optimizer +
recipe state, snapshotted atomically under `torchtune/snapshots/`); a job re-delivered after its worker
was killed restores the last one and runs the recipe with `resume_from_checkpoint: true`, so it loses
at most the steps since then, like the PEFT loop. Nothing finer: the recipe cannot checkpoint mid-epoch.

Everything torchtune-specific lives here and in `torchtune_entry.py`: dropping the backend means
deleting these two files and the setup script.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from core.atomic import atomic_dir
from core.context import JobContext
from workers.modeling.registry import cpu_has_fast_bf16, model_digest, model_presets, pick_device, resolve_model
from core.specs.train import TORCHTUNE_ALL_LAYERS, LoraSpec, TrainSpec
from core.contracts.adapter import AdapterMeta
from core.contracts.metrics import METRICS_FILE, MetricsRow, append_metrics
from workers.modeling.codec import Example, PromptCodec
from workers.train.data import length_bucketed_batches, load_prepared

REPO = Path(__file__).resolve().parents[2]
ENTRY = Path(__file__).resolve().with_name("torchtune_entry.py")
DEFAULT_VENV = REPO / ".venv-torchtune"
TORCHTUNE_VERSION = "0.6.1"
# Line prefixes torchtune_entry prints for this process to read (as there).
METRIC_PREFIX = "NEWSLORA_METRIC "  # one optimizer step's metrics
CHECKPOINT_PREFIX = "NEWSLORA_CHECKPOINT "  # a chunk's checkpoint is written
WARNING_PREFIX = "NEWSLORA_WARNING "  # becomes a warning event
TERMINATE_GRACE_S = 10.0
SNAPSHOTS = "snapshots"  # under the run's torchtune/ folder: the last chunk's checkpoint (torchtune_entry)
RUN_FILE = "run.json"  # under torchtune/: the fingerprint of the run its checkpoints belong to
PID_FILE = "recipe.pid"  # under torchtune/: the recipe subprocess's pid
ADAPTER_META = AdapterMeta.FILE_NAME

# HF (PEFT) module names -> torchtune's names in `lora_llama3_2`.
_ATTN_TO_TUNE = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "output_proj",
                 "output_proj": "output_proj"}
_MLP_HF = {"gate_proj", "up_proj", "down_proj"}
_MLP_TUNE = {"w1", "w2", "w3"}


class TorchtuneEnvMissing(RuntimeError):
    """The isolated torchtune environment is not there."""


class TorchtuneRunFailed(RuntimeError):
    """The recipe subprocess exited with an error."""


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


def plan_steps(spec: TrainSpec, n_examples: int) -> int:
    """Optimizer steps to run, counted as the PEFT loop counts them: spec.max_steps, else spec.epochs
    passes of ceil(n / batch_size) micro-batches, grad_accum to a step (at least 1)."""
    if spec.max_steps is not None:
        return spec.max_steps
    micro_per_epoch = math.ceil(n_examples / spec.batch_size)
    return max(1, math.ceil(spec.epochs * micro_per_epoch / spec.grad_accum))


def sample_order(lengths: list[int], n_samples: int, *, batch_size: int, seed: int) -> list[int]:
    """Example indices in training order, `batch_size` at a time: each pass over the examples is the PEFT
    loop's seeded, length-bucketed batch order, its part-filled batches pooled at the pass's end (torchtune
    drops a last part-filled batch, so every batch here is full)."""
    order: list[int] = []
    epoch = 0
    while len(order) < n_samples:
        batches = length_bucketed_batches(lengths, batch_size, seed=seed, epoch=epoch)
        order += [i for b in batches if len(b) == batch_size for i in b]
        order += [i for b in batches if len(b) != batch_size for i in b]
        epoch += 1
    return order[:n_samples]


# ---------------------------------------------------------------------------------------------
# The recipe's config


def lora_modules(lora: LoraSpec) -> tuple[list[str], bool]:
    """(torchtune attention modules, apply_lora_to_mlp) for the spec's target modules.

    Raises:
        ValueError: a module torchtune's Llama builder cannot put LoRA on, or only part of the MLP
            (torchtune adapts its three MLP projections together or not at all).
    """
    if lora.top_layers is not None:
        raise ValueError(TORCHTUNE_ALL_LAYERS)
    names = lora.target_modules
    if names == ["all-linear"]:
        names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    attn, mlp, unknown = [], set(), []
    for name in names:
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
            f"k_proj, v_proj, o_proj and (all three together) gate_proj, up_proj, down_proj, or ['all-linear']")
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
    cfg = _llama_config(model_dir)
    heads = cfg["num_attention_heads"]
    return {
        "vocab_size": cfg["vocab_size"],
        "num_layers": cfg["num_hidden_layers"],
        "num_heads": heads,
        "num_kv_heads": cfg.get("num_key_value_heads") or heads,
        "embed_dim": cfg["hidden_size"],
        "intermediate_dim": cfg["intermediate_size"],
        "max_seq_len": cfg.get("max_position_embeddings", 4096),
        "norm_eps": cfg.get("rms_norm_eps", 1e-5),
        "rope_base": _rope_theta(cfg),
        "scale_factor": 1,
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
    }


def _llama_config(model_dir: Path) -> dict[str, Any]:
    """A checkpoint's config.json, checked to be a plain Llama that torchtune's Llama builders reproduce.

    Raises:
        ValueError: another architecture, scaled RoPE, biased projections, or an odd head_dim.
    """
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        raise ValueError(f"{model_dir}: unknown architecture {cfg.get('model_type')!r} for the torchtune backend, "
                         f"which trains Llama-architecture checkpoints (LLaMA-2, SmolLM2 / Llama-3.2 style); "
                         f"use backend 'peft'")
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
    return cfg


def _rope_theta(cfg: dict[str, Any]) -> float:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    return float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))


# ---------------------------------------------------------------------------------------------
# The model: builder and checkpointer from the registry

LLAMA2_COMPONENT = "torchtune.models.llama2.lora_llama2"
LLAMA3_2_COMPONENT = "torchtune.models.llama3_2.lora_llama3_2"
LLAMA2_ROPE_THETA = 10000.0  # torchtune's lora_llama2 has no rope_base argument: this is built in


@dataclass(frozen=True)
class BuilderInfo:
    """A torchtune LoRA model builder this backend knows.

    Attributes:
        model_type: the FullModelHFCheckpointer `model_type` its checkpoints are converted with.
        family: "llama2" (untied output head, RoPE theta 10000) or "llama3_2" (tied embeddings allowed,
            any plain RoPE theta through scale_factor 1), as read from a checkpoint's config.json.
        fixed_shape: the shape a fixed-size builder (lora_llama2_7b) always builds; None for a component
            builder, whose shape arguments are read from the checkpoint's config.json.
    """

    model_type: str
    family: str
    fixed_shape: dict[str, int] | None = None


BUILDERS: dict[str, BuilderInfo] = {
    LLAMA2_COMPONENT: BuilderInfo("LLAMA2", "llama2"),
    "torchtune.models.llama2.lora_llama2_7b": BuilderInfo("LLAMA2", "llama2", {
        "vocab_size": 32000, "num_layers": 32, "num_heads": 32, "num_kv_heads": 32, "embed_dim": 4096,
        "intermediate_dim": 11008}),
    LLAMA3_2_COMPONENT: BuilderInfo("LLAMA3_2", "llama3_2"),
}


@dataclass(frozen=True)
class TorchtuneModel:
    """What the recipe builds and how its checkpointer reads and writes the weights.

    Attributes:
        builder: the LoRA model builder's import path (a key of BUILDERS).
        model_type: the checkpointer's model_type (LLAMA2, LLAMA3_2).
        shape: the builder's shape arguments (empty for a fixed-size builder).
        source: where the choice came from, for messages ("preset llama2-7b", ".../config.json").
    """

    builder: str
    model_type: str
    shape: dict[str, Any] = field(default_factory=dict)
    source: str = ""


def llama_family(model_dir: Path) -> str:
    """"llama2" or "llama3_2": which torchtune Llama builder reproduces this checkpoint.

    LLaMA-2: untied input/output embeddings and RoPE theta 10000 without scaling (key/value heads may be
    fewer than heads, as in LLaMA-2-70B). SmolLM2 and Llama-3.2: tied embeddings, any plain RoPE theta.

    Raises:
        ValueError: not a plain Llama (see _llama_config), or an untied one with another RoPE theta,
            which neither builder reproduces.
    """
    cfg = _llama_config(model_dir)
    tied = bool(cfg.get("tie_word_embeddings", False))
    theta = _rope_theta(cfg)
    if tied:
        return "llama3_2"
    if theta == LLAMA2_ROPE_THETA:
        return "llama2"
    raise ValueError(
        f"{model_dir}: a Llama with untied embeddings and RoPE theta {theta:g} matches no torchtune builder this "
        f"backend knows (LLaMA-2: untied, theta 10000; SmolLM2 / Llama-3.2: tied embeddings); use backend 'peft'")


def _component_shape(model_dir: Path, family: str) -> dict[str, Any]:
    args = model_builder_args(model_dir)
    if family == "llama3_2":
        return args
    # torchtune.models.llama2.lora_llama2: no rope_base (10000 built in), no scaling, an untied output head.
    return {k: args[k] for k in ("vocab_size", "num_layers", "num_heads", "num_kv_heads", "embed_dim",
                                 "intermediate_dim", "max_seq_len", "norm_eps")}


def torchtune_model(model_ref: str, model_dir: Path) -> TorchtuneModel:
    """The torchtune builder, checkpointer model_type and shape for a model.

    A preset names its builder and model type in its registry entry (configs/models/NAME.yaml:
    `torchtune_builder`, `torchtune_model_type`); a local checkpoint folder gets the component builder
    of its family (`llama_family`), shaped from its config.json: `lora_llama2` / LLAMA2 for a LLaMA-2,
    `lora_llama3_2` / LLAMA3_2 for SmolLM2 and Llama-3.2.

    Raises:
        ValueError: an unknown architecture or builder, a registry entry whose model type contradicts
            its builder, or a checkpoint that the preset's builder does not build; each says what to do.
    """
    model_dir = Path(model_dir)
    family = llama_family(model_dir)
    preset = model_presets().get(model_ref)
    if preset is None or not preset.torchtune_builder:
        builder = LLAMA2_COMPONENT if family == "llama2" else LLAMA3_2_COMPONENT
        return TorchtuneModel(builder, BUILDERS[builder].model_type, _component_shape(model_dir, family),
                              source=str(model_dir / "config.json"))
    entry = f"configs/models/{preset.name}.yaml"
    info = BUILDERS.get(preset.torchtune_builder)
    if info is None:
        raise ValueError(f"{entry}: torchtune_builder {preset.torchtune_builder!r} is not one the torchtune backend "
                         f"knows ({', '.join(BUILDERS)})")
    if preset.torchtune_model_type and preset.torchtune_model_type != info.model_type:
        raise ValueError(f"{entry}: torchtune_model_type {preset.torchtune_model_type!r} does not go with "
                         f"{preset.torchtune_builder} (its checkpoints are {info.model_type})")
    if family != info.family:
        raise ValueError(f"preset {preset.name} builds {preset.torchtune_builder}, but its checkpoint {model_dir} is "
                         f"a {family.replace('_', '.')}-style Llama; point the preset at the right checkpoint, or "
                         f"give the folder itself as the model")
    if info.fixed_shape is None:
        return TorchtuneModel(preset.torchtune_builder, info.model_type, _component_shape(model_dir, family),
                              source=f"preset {preset.name}")
    have = _component_shape(model_dir, family)
    wrong = {k: (v, have[k]) for k, v in info.fixed_shape.items() if have[k] != v}
    if wrong:
        shown = ", ".join(f"{k} {want} (checkpoint: {got})" for k, (want, got) in wrong.items())
        raise ValueError(f"preset {preset.name}'s builder {preset.torchtune_builder} builds {shown}: point the "
                         f"preset at a checkpoint of that size, or give the folder itself as the model (its "
                         f"builder then comes from its config.json)")
    return TorchtuneModel(preset.torchtune_builder, info.model_type, {}, source=f"preset {preset.name}")


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


def chunk_steps(spec: TrainSpec, total_steps: int) -> int:
    """Optimizer steps per recipe epoch: spec.save_every, the checkpoint granularity (at most the run)."""
    return max(1, min(spec.save_every, total_steps))


def wandb_logger_args(spec: TrainSpec, out_dir: Path) -> dict[str, Any] | None:
    """torchtune WandBLogger arguments named as the PEFT loop names its run (None without spec.wandb).

    Project `newslora`, run id `train-<uuid5 of the out_dir>` (as PeftLoraTrainer._setup_wandb), files
    under out_dir, resume="allow" so each resumed session appends to the same run. Offline unless
    WANDB_MODE says otherwise (run_recipe sets it in the subprocess's environment).
    """
    if not spec.wandb:
        return None
    run_id = f"train-{uuid.uuid5(uuid.NAMESPACE_URL, str(Path(out_dir).resolve())).hex[:12]}"
    return {"project": "newslora", "id": run_id, "log_dir": str(out_dir), "resume": "allow",
            "config": spec.model_dump(mode="json"),
            # the recipe's config is logged again on a resume, with resume_from_checkpoint changed
            "allow_val_change": True}


def recipe_config(spec: TrainSpec, *, model_dir: Path, run_dir: Path, tokens_path: Path, total_steps: int,
                  pad_id: int, device: str, dtype: str, keep_merged: bool = False, resume: bool = False,
                  wandb: dict[str, Any] | None = None, tt_model: TorchtuneModel | None = None) -> dict[str, Any]:
    """The YAML config (as a dict) for torchtune's `lora_finetune_single_device` recipe.

    Args:
        resume: continue from the checkpoint in run_dir (see the module docstring).
        wandb: WandBLogger arguments (wandb_logger_args), or None for stdout metrics only.
        tt_model: the builder and checkpointer model type; by default `torchtune_model(spec.model, model_dir)`.
    """
    attn, mlp = lora_modules(spec.lora)
    weights = sorted(p.name for p in Path(model_dir).glob("*.safetensors"))
    if not weights:
        raise ValueError(f"{model_dir} has no *.safetensors weights: torchtune's HF checkpointer reads "
                         f"safetensors; re-save the model with save_pretrained()")
    tt_model = tt_model or torchtune_model(spec.model, model_dir)
    per_chunk = chunk_steps(spec, total_steps)
    return {
        "output_dir": str(run_dir),
        "model": {
            "_component_": tt_model.builder,
            "lora_attn_modules": attn,
            "apply_lora_to_mlp": mlp,
            "apply_lora_to_output": False,
            **tt_model.shape,
            "lora_rank": spec.lora.rank,
            "lora_alpha": spec.lora.alpha,
            "lora_dropout": spec.lora.dropout,
        },
        # The data arrive tokenised; the recipe only reads the tokenizer's pad_id.
        "tokenizer": {"_component_": "torchtune_entry.TokenizerStub", "pad_id": pad_id},
        "checkpointer": {
            "_component_": "torchtune_entry.snapshot_checkpointer",
            "checkpoint_dir": str(model_dir),
            "checkpoint_files": weights,
            "recipe_checkpoint": None,
            "output_dir": str(run_dir),
            "model_type": tt_model.model_type,
            "snapshot_dir": str(run_dir / SNAPSHOTS),
            "steps_per_chunk": per_chunk,
        },
        "resume_from_checkpoint": resume,
        "save_adapter_weights_only": not keep_merged,  # the merged full model only for verification
        "dataset": {"_component_": "torchtune_entry.token_dataset", "path": str(tokens_path)},
        "collate_fn": "torchtune.data.padded_collate_sft",
        "seed": spec.seed,
        "shuffle": False,  # the token file is already in training order (seeded shuffle per pass)
        "batch_size": spec.batch_size,
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": spec.learning_rate,
                      "weight_decay": spec.weight_decay},
        "lr_scheduler": {"_component_": "torchtune_entry.cosine_schedule_with_warmup",
                         "num_warmup_steps": spec.warmup_steps, "total_steps": total_steps},
        "loss": {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"},
        # The token file holds exactly total_steps optimizer steps of samples, cut into chunks of
        # per_chunk steps: one recipe epoch each (torchtune_entry.ChunkSampler), a checkpoint at each end.
        "epochs": math.ceil(total_steps / per_chunk),
        "max_steps_per_epoch": per_chunk,
        "newslora": {"chunk_samples": per_chunk * spec.batch_size * spec.grad_accum},  # read by torchtune_entry
        "gradient_accumulation_steps": spec.grad_accum,
        "clip_grad_norm": getattr(spec, "max_grad_norm", None),  # None: off
        "compile": False,
        "metric_logger": {"_component_": "torchtune_entry.MetricLoggers", "wandb": wandb},
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
               step_tokens: list[int], log_path: Path,
               on_step: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Run the recipe subprocess to its end; returns one history row per optimizer step it ran.

    Each metric line becomes a `ctx.progress` event (and goes to `on_step` as it arrives), each
    checkpoint line an event, each warning line a warning event; `ctx.check_cancel()` is polled about
    twice a second, and on cancel the subprocess (and its process group) gets SIGTERM, then SIGKILL.
    The subprocess's pid is kept in `recipe.pid` beside the config, and it exits by itself if this
    process dies. The log is appended to, so a resumed run's log follows the killed one's.

    Raises:
        JobCancelled: the job was cancelled (the subprocess is gone when this is raised).
        TorchtuneRunFailed: the recipe exited with an error; the message holds its last lines.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    env.setdefault("WANDB_MODE", "offline")  # as the PEFT loop: W&B syncs only where asked to
    cmd = [str(python), str(ENTRY), "--config", str(config_path), "--parent-pid", str(os.getpid())]
    wait_for_orphan(config_path.parent / PID_FILE)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=env, cwd=str(config_path.parent), start_new_session=True)
    (config_path.parent / PID_FILE).write_text(str(proc.pid))
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
        with log_path.open("a", encoding="utf-8") as log_fh:
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
                    if on_step is not None:
                        on_step(row)
                    ctx.progress(row["step"], total_steps, message="train", loss=row["loss"], lr=row["lr"],
                                 tokens_per_s=row.get("tokens_per_s"))
                elif line.startswith(CHECKPOINT_PREFIX):
                    saved = json.loads(line[len(CHECKPOINT_PREFIX):])
                    if not saved.get("final"):
                        ctx.event(f"train: checkpoint at step {saved['step']} of {total_steps}",
                                  metrics={"checkpoint_step": saved["step"]})
                elif line.startswith(WARNING_PREFIX):
                    ctx.event(line[len(WARNING_PREFIX):].strip(), level="warning")
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
    tokens = step_tokens[step - 1] if 0 < step <= len(step_tokens) else None
    row: dict[str, Any] = {"step": step, "loss": raw["loss"], "lr": raw["lr"], "tokens": tokens,
                           "time": raw.get("time")}
    if history and tokens and row["time"] is not None and history[-1]["time"] is not None:
        row["tokens_per_s"] = tokens / max(row["time"] - history[-1]["time"], 1e-9)
    return row


def wait_for_orphan(pid_file: Path, timeout_s: float = TERMINATE_GRACE_S) -> None:
    """Make sure the recipe subprocess of a killed earlier attempt is gone before a new one starts.

    It exits by itself within a fraction of a second of its parent's death (torchtune_entry's
    exit_with_parent); if it is somehow still there after timeout_s, it is killed.
    """
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    deadline = time.monotonic() + timeout_s
    while _is_recipe_process(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
            break
        time.sleep(0.1)
    pid_file.unlink(missing_ok=True)


def _is_recipe_process(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    zombie = any(line.startswith("State:") and "Z" in line.split()[1] for line in status.splitlines())
    return not zombie and ENTRY.name.encode() in cmdline


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
                        base_model_path: Path, adapter_meta: dict[str, Any]) -> Path:
    """Turn torchtune's PEFT-format adapter output into a PEFT adapter folder.

    torchtune's HF checkpointer already writes `adapter_model.safetensors` with PEFT key names
    (`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`) and with lora_B of q/k
    permuted back from torchtune's interleaved RoPE layout. Its `adapter_config.json` lacks task type
    and dropout, so a full LoraConfig is written instead. `adapter_meta` goes to newslora.json. The folder
    is built aside and renamed into place, so a reader never sees half an adapter.

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
    with atomic_dir(adapter_dir) as tmp:
        save_file(weights, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=hf_modules,
                   bias="none", task_type="CAUSAL_LM",
                   base_model_name_or_path=str(base_model_path)).save_pretrained(tmp)
        AdapterMeta(**adapter_meta).save(tmp)
    return adapter_dir


# ---------------------------------------------------------------------------------------------
# The entry point


def train_torchtune(spec: TrainSpec, dataset_dir: Path, out_dir: Path, ctx: JobContext, *,
                    keep_merged: bool = False) -> dict[str, Any]:
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
        The PEFT loop's result shape: {"adapter_dir", "base_model", "base_model_digest", "template",
        "instruction", "label_names", "dataset_hash", "steps", "total_steps", "metrics": {train_loss,
        val_loss, val_accuracy, tokens_per_s, ...}, "history": [the eval row], "resumed_from_step"
        (None, or the step whose checkpoint this run continued from), "backend": "torchtune"}.

    Raises:
        TorchtuneEnvMissing: the isolated environment has not been created.
        JobCancelled: cancelled while training (the subprocess has been terminated).
        TorchtuneRunFailed: the recipe failed (the message holds its log's last lines).
        IncompatibleCheckpoint: out_dir holds a checkpoint of a run with other settings or data.
        DatasetNotPrepared, ModelNotFound, ValueError: bad dataset, model or spec, saying what to change.
    """
    from workers.modeling.registry import load_tokenizer

    python = torchtune_python()
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    started = time.perf_counter()
    data = load_prepared(dataset_dir)
    meta = data.meta
    model_dir = resolve_model(spec.model)
    device = pick_device(spec.device)
    dtype = recipe_dtype(spec, device)
    lora_modules(spec.lora)  # fail on bad target modules before tokenising
    tt_model = torchtune_model(spec.model, model_dir)  # and on a model torchtune cannot build

    run_dir = out_dir / "torchtune"
    run_dir.mkdir(parents=True, exist_ok=True)
    wait_for_orphan(run_dir / PID_FILE)  # a killed attempt's recipe is gone before its folder is touched
    ctx.check_cancel()

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
    total_steps = plan_steps(spec, len(examples))
    per_step = spec.batch_size * spec.grad_accum
    order = sample_order([len(e.input_ids) for e in examples], total_steps * per_step,
                         batch_size=spec.batch_size, seed=spec.seed)
    tokens_path = write_token_file(run_dir / "train_tokens.jsonl", examples, order)
    # Real tokens each optimizer step consumes (padding excluded), as the PEFT loop counts them.
    step_tokens = [sum(len(examples[i].input_ids) for i in order[s * per_step:(s + 1) * per_step])
                   for s in range(total_steps)]

    config = recipe_config(spec, model_dir=model_dir, run_dir=run_dir, tokens_path=tokens_path,
                           total_steps=total_steps, pad_id=tokenizer.pad_token_id, device=device, dtype=dtype,
                           keep_merged=keep_merged, wandb=wandb_logger_args(spec, out_dir), tt_model=tt_model)
    per_chunk = chunk_steps(spec, total_steps)
    resumed_epoch = restore_checkpoint(run_dir, run_fingerprint(config, tokens_path))
    resumed_from_step = None if resumed_epoch is None else (resumed_epoch + 1) * per_chunk
    config["resume_from_checkpoint"] = resumed_from_step is not None
    config_path = run_dir / "torchtune.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    prior_steps = _keep_metrics_upto(out_dir, resumed_from_step or 0)
    if resumed_from_step is None:
        ctx.event(f"torchtune: starting lora_finetune_single_device ({tt_model.builder}, {tt_model.model_type}, "
                  f"from {tt_model.source})",
                  metrics={"steps": total_steps, "examples": len(examples), "device": device, "dtype": dtype,
                           "builder": tt_model.builder, "checkpoint_every": per_chunk})
    else:
        ctx.event(f"train: resumed from step {resumed_from_step} of {total_steps} (torchtune checkpoint "
                  f"epoch_{resumed_epoch})", metrics={"resumed_from_step": resumed_from_step})

    t0 = time.perf_counter()
    new_steps = run_recipe(python, config_path, ctx, total_steps=total_steps, step_tokens=step_tokens,
                           log_path=run_dir / "recipe.log",
                           on_step=lambda row: _append_metrics(out_dir, [_metrics_row(row)]))
    recipe_seconds = time.perf_counter() - t0
    steps = prior_steps + new_steps
    if [r["step"] for r in steps] != list(range(1, total_steps + 1)):
        raise TorchtuneRunFailed(f"torchtune logged {len(new_steps)} optimizer steps after step "
                                 f"{resumed_from_step or 0}, {total_steps} in all were planned; see "
                                 f"{run_dir / 'recipe.log'}")

    digest = model_digest(model_dir)
    adapter_meta = {
        "template": meta.template, "instruction": meta.instruction, "label_names": meta.label_names,
        "base_model": spec.model, "base_model_path": str(model_dir), "base_model_digest": digest,
        "dataset_hash": meta.hash, "steps": total_steps, "max_seq_len": spec.max_seq_len,
        "spec": spec.model_dump(mode="json"), "code_version": _code_version(), "backend": "torchtune",
        "torchtune_version": TORCHTUNE_VERSION,
    }
    last_epoch = math.ceil(total_steps / per_chunk) - 1
    adapter_dir = export_peft_adapter(run_dir / f"epoch_{last_epoch}", out_dir / "adapter", lora=spec.lora,
                                      base_model_path=model_dir, adapter_meta=adapter_meta)
    if not keep_merged:
        for d in run_dir.glob("epoch_*"):
            shutil.rmtree(d)

    ctx.check_cancel()
    history: list[dict[str, Any]] = []
    if val_examples:
        row = validate_adapter(model_dir, adapter_dir, val_examples, encoder, spec=spec, device=device,
                               pad_id=tokenizer.pad_token_id, step=total_steps)
        history.append(row)
        _append_metrics(out_dir, [{"type": "eval", **row}])
        ctx.event(f"eval at step {total_steps}: val_loss {row['val_loss']:.4f}, val_accuracy "
                  f"{row['val_accuracy']:.3f}", metrics=row)

    metrics = _metrics(steps, history, recipe_seconds=recipe_seconds, wall_s=time.perf_counter() - started,
                       n_examples=len(examples), epochs=total_steps * per_step / max(1, len(examples)),
                       dtype=dtype, device=device)
    ctx.event("torchtune: done", metrics=metrics)
    return {
        "adapter_dir": str(adapter_dir),
        "base_model": spec.model,
        "base_model_digest": digest,
        "template": meta.template,
        "instruction": meta.instruction,
        "label_names": list(meta.label_names),
        "dataset_hash": meta.hash,
        "steps": total_steps,
        "total_steps": total_steps,
        "metrics": metrics,
        "history": history,
        "resumed_from_step": resumed_from_step,
        "backend": "torchtune",
    }


def run_fingerprint(config: dict[str, Any], tokens_path: Path) -> str:
    """What a checkpoint must have been trained with to be resumed: the recipe config (less the resume
    flag and the loggers) and the token file's content."""
    stable = {k: v for k, v in config.items() if k not in ("resume_from_checkpoint", "metric_logger", "device")}
    h = hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode())
    h.update(Path(tokens_path).read_bytes())
    return h.hexdigest()[:24]


def restore_checkpoint(run_dir: Path, fingerprint: str) -> int | None:
    """Put the last chunk's checkpoint back where torchtune's resume reads it; the epoch it ended, or None.

    torchtune resumes from `epoch_N/adapter_model.pt` (the largest N) and `recipe_state/recipe_state.pt`
    in its output_dir; both are rebuilt here from `snapshots/epoch_N`, which torchtune_entry wrote
    atomically, so a kill in the middle of torchtune's own save cannot leave a half-written state. With
    no snapshot, the folder is cleared for a fresh run.

    Raises:
        IncompatibleCheckpoint: the snapshot belongs to a run with another config or token file.
    """
    from workers.train.checkpoint import IncompatibleCheckpoint

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
    from core.contracts.metrics import read_metrics, truncate_metrics_after
    truncate_metrics_after(out_dir, step)
    return [r.model_dump(exclude_none=True) for r in read_metrics(out_dir) if r.type == "step"]


def write_token_file(path: Path, examples: list[Example], order: list[int]) -> Path:
    """The recipe's dataset: one {"tokens", "labels"} line per sample, in training order."""
    with path.open("w", encoding="utf-8") as fh:
        for i in order:
            fh.write(json.dumps({"tokens": examples[i].input_ids, "labels": examples[i].labels}) + "\n")
    return path


def validate_adapter(model_dir: Path, adapter_dir: Path, examples: list[Example], encoder: PromptCodec, *,
                     spec: TrainSpec, device: str, pad_id: int, step: int, batch_size: int = 16) -> dict[str, Any]:
    """Score the validation examples with the exported adapter loaded by plain PEFT, as the PEFT loop
    scores them (`score_responses`): mean loss per response token (label + EOS) and label-scoring accuracy.

    Returns:
        {"step", "val_loss", "val_accuracy", "val_items", "eval_s"}
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from workers.modeling.registry import pick_dtype
    from workers.modeling.forward import prefix_kv
    from workers.modeling.scoring import score_responses

    started = time.perf_counter()
    dtype = pick_dtype(spec.dtype if spec.dtype != "fp16" else "auto", device)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = PeftModel.from_pretrained(base, adapter_dir).to(device).eval()
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        if dtype != torch.float32:
            # As the PEFT loop computes: LoRA matmuls in the base's dtype under autocast, instead of
            # PEFT's default of casting every adapted layer's input up to fp32 and back.
            from peft.helpers import disable_input_dtype_casting
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


def _code_version() -> str:
    from core.version import code_version
    return code_version()


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


# ---------------------------------------------------------------------------------------------
# The throughput benchmark's figure


def torchtune_tokens_per_s(model: str = "smollm2-135m", *, steps: int = 6, batch_size: int = 16,
                           max_seq_len: int = 160, dtype: str = "auto", device: str = "auto",
                           dataset_dir: Path | None = None, n_records: int = 64,
                           work_dir: Path | None = None, seed: int = 0) -> dict[str, Any]:
    """Training throughput of the torchtune backend, for `bench/train_throughput.py`.

    Runs `train_torchtune` for a few optimizer steps with the spec's default LoRA and reports real
    tokens (prompt + response, padding excluded, as the PEFT loop counts them) per second over the
    steps after the first. Startup (subprocess, torchtune import, checkpoint load, adapter export) is
    reported apart as startup_s.

    Args:
        model: a model preset or checkpoint folder.
        steps, batch_size, max_seq_len, dtype, device: as in TrainSpec.
        dataset_dir: a prepared dataset; by default `n_records` AG News articles from the shared data
            ($NEWSLORA_SHARED_DATA/ag_news/train.jsonl) are written in the prepared format.
        work_dir: where the run goes (a temporary folder by default, removed afterwards).

    Returns:
        {"backend", "model", "tokens_per_s", "steps", "batch_size", "max_seq_len", "dtype", "device",
         "wall_s", "train_s", "startup_s", "loss_first", "loss_last", "versions"}.
    """
    import tempfile

    from core.context import LocalContext

    tmp = None
    if work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="newslora-tt-bench-")
        work_dir = Path(tmp.name)
    work_dir = Path(work_dir)
    try:
        if dataset_dir is None:
            dataset_dir = _ag_news_bench_dataset(work_dir / "dataset", n_records)
        spec = TrainSpec(dataset_id=1, model=model, backend="torchtune", max_steps=steps, batch_size=batch_size,
                         max_seq_len=max_seq_len, dtype=dtype, device=device, warmup_steps=1, seed=seed)
        t0 = time.perf_counter()
        result = train_torchtune(spec, dataset_dir, work_dir / "out", LocalContext(work_dir=work_dir))
        wall = time.perf_counter() - t0
        steps_rows = [json.loads(line) for line in (work_dir / "out" / METRICS_FILE).read_text().splitlines()
                      if "loss" in json.loads(line)]
        dev = pick_device(device)
        return {
            "backend": "torchtune",
            "model": model,
            "tokens_per_s": result["metrics"]["tokens_per_s"],
            "steps": steps,
            "batch_size": batch_size,
            "max_seq_len": max_seq_len,
            "dtype": recipe_dtype(spec, dev),
            "device": dev,
            "wall_s": wall,
            "train_s": result["metrics"]["train_s"],
            "startup_s": wall - _steady_seconds(result["metrics"]["tokens_per_s"], steps_rows),
            "loss_first": steps_rows[0]["loss"],
            "loss_last": steps_rows[-1]["loss"],
            "versions": {"torchtune": TORCHTUNE_VERSION},
        }
    finally:
        if tmp is not None:
            tmp.cleanup()


def _steady_seconds(rate: float | None, steps: list[dict[str, Any]]) -> float:
    tokens = sum(r.get("tokens") or 0 for r in steps[1:])
    return tokens / rate if rate else 0.0


def _ag_news_bench_dataset(root: Path, n_records: int) -> Path:
    """A prepared-dataset folder of the first n AG News training articles from the shared data."""
    from workers.modeling.prompts import default_instruction

    shared = Path(os.environ.get("NEWSLORA_SHARED_DATA", REPO.parent / "shared" / "data")) / "ag_news"
    if not (shared / "train.jsonl").is_file():
        raise FileNotFoundError(f"no AG News data at {shared}: set NEWSLORA_SHARED_DATA, or pass dataset_dir")
    labels = (shared / "classes.txt").read_text().split("\n") if (shared / "classes.txt").is_file() else []
    labels = [x.strip() for x in labels if x.strip()] or ["World", "Sports", "Business", "Sci/Tech"]
    instruction = default_instruction(labels)
    root.mkdir(parents=True, exist_ok=True)
    with (shared / "train.jsonl").open(encoding="utf-8") as src, (root / "train.jsonl").open("w") as dst:
        for i, line in enumerate(src):
            if i >= n_records:
                break
            row = json.loads(line)
            dst.write(json.dumps({"id": str(i), "instruction": instruction, "input": row["text"],
                                  "output": labels[row["label"]], "label_id": row["label"]}) + "\n")
    (root / "validation.jsonl").write_text("")
    (root / "meta.json").write_text(json.dumps({"label_names": labels, "template": "alpaca",
                                                "instruction": instruction, "hash": f"ag-news-first-{n_records}"}))
    return root
