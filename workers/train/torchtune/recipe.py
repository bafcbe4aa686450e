"""torchtune's `lora_finetune_single_device` recipe, configured: the optimizer steps and the order of the
samples, the model builder and checkpointer for a model, and the recipe's YAML config.

The builder and the checkpointer's model type come from the model's registry entry (`torchtune_builder`,
`torchtune_model_type` in configs/models/*.yaml), or, for a local checkpoint folder, from its config.json.
The config names small components from `entry.py` (the token dataset, the metric loggers, the schedule and
the snapshotting checkpointer), which the recipe subprocess imports as a top-level module.
"""
from __future__ import annotations

import hashlib
import json
import math
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.specs.train import TORCHTUNE_ALL_LAYERS, LoraSpec, TrainSpec
from workers.modeling.codec import Example
from workers.modeling.registry import cpu_has_fast_bf16, model_presets
from workers.train.data import length_bucketed_batches
from workers.train.torchtune.entry import COMPONENTS

SNAPSHOTS = "snapshots"  # under the run's torchtune/ folder: the last chunk's checkpoint (entry.write_snapshot)

# HF (PEFT) module names -> torchtune's names in `lora_llama3_2`.
_ATTN_TO_TUNE = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "output_proj",
                 "output_proj": "output_proj"}
_MLP_HF = {"gate_proj", "up_proj", "down_proj"}
_MLP_TUNE = {"w1", "w2", "w3"}

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


def write_token_file(path: Path, examples: list[Example], order: list[int]) -> Path:
    """The recipe's dataset: one {"tokens", "labels"} line per sample, in training order."""
    with path.open("w", encoding="utf-8") as fh:
        for i in order:
            fh.write(json.dumps({"tokens": examples[i].input_ids, "labels": examples[i].labels}) + "\n")
    return path


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
    WANDB_MODE says otherwise (env.recipe_environment sets it in the subprocess's environment).
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
        resume: continue from the checkpoint in run_dir (see backend.py's docstring).
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
        "tokenizer": {"_component_": f"{COMPONENTS}.TokenizerStub", "pad_id": pad_id},
        "checkpointer": {
            "_component_": f"{COMPONENTS}.snapshot_checkpointer",
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
        "dataset": {"_component_": f"{COMPONENTS}.token_dataset", "path": str(tokens_path)},
        "collate_fn": "torchtune.data.padded_collate_sft",
        "seed": spec.seed,
        "shuffle": False,  # the token file is already in training order (seeded shuffle per pass)
        "batch_size": spec.batch_size,
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": spec.learning_rate,
                      "weight_decay": spec.weight_decay},
        "lr_scheduler": {"_component_": f"{COMPONENTS}.cosine_schedule_with_warmup",
                         "num_warmup_steps": spec.warmup_steps, "total_steps": total_steps},
        "loss": {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"},
        # The token file holds exactly total_steps optimizer steps of samples, cut into chunks of
        # per_chunk steps: one recipe epoch each (entry.ChunkSampler), a checkpoint at each end.
        "epochs": math.ceil(total_steps / per_chunk),
        "max_steps_per_epoch": per_chunk,
        "newslora": {"chunk_samples": per_chunk * spec.batch_size * spec.grad_accum},  # read by entry.main
        "gradient_accumulation_steps": spec.grad_accum,
        "clip_grad_norm": getattr(spec, "max_grad_norm", None),  # None: off
        "compile": False,
        "metric_logger": {"_component_": f"{COMPONENTS}.MetricLoggers", "wandb": wandb},
        "log_every_n_steps": 1,
        "log_peak_memory_stats": False,
        "device": "cuda" if device.startswith("cuda") else device,
        "dtype": dtype,
        "enable_activation_checkpointing": False,
        "enable_activation_offloading": False,
        "profiler": {"_component_": "torchtune.training.setup_torch_profiler", "enabled": False},
    }


def run_fingerprint(config: dict[str, Any], tokens_path: Path) -> str:
    """What a checkpoint must have been trained with to be resumed: the recipe config (less the resume
    flag and the loggers) and the token file's content."""
    stable = {k: v for k, v in config.items() if k not in ("resume_from_checkpoint", "metric_logger", "device")}
    h = hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode())
    h.update(Path(tokens_path).read_bytes())
    return h.hexdigest()[:24]
