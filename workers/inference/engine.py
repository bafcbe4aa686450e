"""One base model in memory serving the base and several LoRA adapters, cached across jobs.

The base weights are loaded once per (model, dtype, device) and process. An adapter is merged once
into its own copy of the weights it changes (W + scale * B @ A, computed in fp32 and rounded once to
the base's dtype); `use(adapter)` swaps those tensors into the base's linear layers for the block and
swaps the base's back afterwards. Classification with an adapter therefore runs the plain model at
the base's speed (no LoRA matmuls per token), switching adapters costs a pointer swap per layer, and
the base's own tensors are never modified (no merge/unmerge rounding drift). Merged copies are kept
for up to `max_adapters` adapters and evicted least recently used first.
"""
from __future__ import annotations

import contextlib
import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file

from core.contracts.adapter import AdapterMeta
from workers.inference.adapter import AdapterError, AdapterRef
from workers.modeling.forward import prefix_kv
from workers.modeling.lora_forward import merge_lora
from workers.modeling.registry import load_model, model_digest, pick_device, pick_dtype, resolve_model

DEFAULT_MAX_ADAPTERS = 4


_UNSUPPORTED_LORA = {"use_dora": "DoRA", "modules_to_save": "modules_to_save", "layer_replication": "layer replication",
                     "trainable_token_indices": "trainable tokens"}


def merged_lora_weights(model: Any, path: Path) -> dict[str, torch.nn.Parameter]:
    """The weights a LoRA adapter changes, merged: {module name: W + scale * B @ A}, in W's dtype and device.

    The sum is computed in fp32 and rounded once. `scale` is lora_alpha / r (lora_alpha / sqrt(r) with
    rsLoRA), with PEFT's per-module `rank_pattern` / `alpha_pattern` honoured.

    Raises:
        AdapterError: no weights file, a LoRA variant that is not a plain linear delta (DoRA, embeddings,
            modules_to_save, a bias), or a module the base model does not have.
    """
    path = Path(path)
    cfg = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: a {cfg.get('peft_type')} adapter, not LoRA; newslora serves LoRA adapters")
    used = [name for key, name in _UNSUPPORTED_LORA.items() if cfg.get(key)]
    if cfg.get("bias", "none") != "none":
        used.append(f"bias={cfg['bias']!r}")
    if used:
        raise AdapterError(f"{path}: LoRA with {', '.join(used)} cannot be merged into the base's linear weights; "
                           f"train a plain LoRA adapter (newslora's trainers do)")
    state = _adapter_state(path)
    alpha, rslora = float(cfg.get("lora_alpha", 8)), bool(cfg.get("use_rslora"))
    alpha_pattern = cfg.get("alpha_pattern") or {}
    out: dict[str, torch.Tensor] = {}
    for key, a in state.items():
        if not key.endswith(".lora_A.weight"):
            if ".lora_" in key and not key.endswith(".lora_B.weight"):
                raise AdapterError(f"{path}: weight {key} is not a linear LoRA pair (lora_A/lora_B); "
                                   f"only linear layers can be merged")
            continue
        module = key[:-len(".lora_A.weight")].removeprefix("base_model.model.")
        b = state[key[:-len("lora_A.weight")] + "lora_B.weight"]
        try:
            target = model.get_submodule(module)
        except AttributeError:
            raise AdapterError(f"{path}: the adapter adapts {module}, which {type(model).__name__} does not "
                               f"have; it was trained for another architecture") from None
        r = a.shape[0]
        mod_alpha = next((float(v) for pat, v in alpha_pattern.items()
                          if re.fullmatch(rf"(.*\.)?{pat}", module)), alpha)
        scale = mod_alpha / (r ** 0.5 if rslora else r)
        if cfg.get("fan_in_fan_out"):  # stored (in, r) and (r, out): B @ A is the transposed delta
            a, b = b.T, a.T
        w = target.weight
        if (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise AdapterError(f"{path}: {module}'s LoRA delta has shape {(b.shape[0], a.shape[1])}, the base's "
                               f"weight {tuple(w.shape)}; it was trained for another base model")
        out[module] = torch.nn.Parameter(merge_lora(w, a, b, scale), requires_grad=False)
    if not out:
        raise AdapterError(f"{path}: the adapter holds no LoRA weights")
    return out


def _adapter_state(path: Path) -> dict[str, torch.Tensor]:
    if (path / "adapter_model.safetensors").is_file():
        return load_file(str(path / "adapter_model.safetensors"))
    if (path / "adapter_model.bin").is_file():
        return torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise AdapterError(f"{path} holds no adapter_model.safetensors (or .bin): the adapter's weights are missing; "
                       f"re-run the training job")


@dataclass
class _Merged:
    """A loaded adapter: its metadata and its merged copy of the weights it changes."""

    meta: AdapterMeta
    weights: dict[str, torch.nn.Parameter]


class InferenceEngine:
    """The base model and tokenizer of one (model, dtype, device), plus up to `max_adapters` LoRA adapters.

    Use `get_engine()` rather than building one: it caches engines per process.

    Attributes:
        model: the Hugging Face causal LM (always the same object, never PEFT-wrapped: inside
            `use(adapter)` its adapted linear layers hold the adapter's merged weights).
        tokenizer: its tokenizer, `pad_token` set.
        base_loads: class-wide count of base-model loads (tests check that adapters never reload the base).
    """

    base_loads = 0

    def __init__(self, model_ref: str, *, dtype: str = "auto", device: str = "auto",
                 max_adapters: int = DEFAULT_MAX_ADAPTERS) -> None:
        if max_adapters < 1:
            raise ValueError(f"max_adapters={max_adapters}: an engine must be able to hold at least one adapter")
        self.model_ref = model_ref
        self.device = pick_device(device)
        self.torch_dtype = pick_dtype(dtype, self.device)
        self.model, self.tokenizer = load_model(model_ref, dtype=dtype, device=self.device)
        InferenceEngine.base_loads += 1
        self.digest = model_digest(model_ref)
        self.max_adapters = max_adapters
        self._adapters: OrderedDict[str, _Merged] = OrderedDict()  # name -> merged weights, LRU order
        self._prefix_kv: OrderedDict[tuple, tuple] = OrderedDict()  # (adapter name, prefix ids) -> KV
        self.lock = threading.RLock()

    # ------------------------------------------------------------------ model parts

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)

    @property
    def loaded_adapters(self) -> list[int]:
        """Adapter ids in memory, least recently used first."""
        return [int(name[1:]) for name in self._adapters]

    # ------------------------------------------------------------------ adapters

    def adapter_meta(self, adapter: AdapterRef) -> AdapterMeta:
        """The adapter's newslora.json (`adapter.meta`, read once per ref), checked against this engine's base
        model.

        Raises:
            AdapterError: missing folder/files, or trained for another base model (digest differs).
        """
        meta = adapter.meta
        if meta.base_model_digest != self.digest:
            raise AdapterError(
                f"adapter {adapter.adapter_id} ({adapter.path}) was trained for base model "
                f"{meta.base_model or '?'} (digest {meta.base_model_digest}), not {self.model_ref!r} "
                f"(digest {self.digest}): classify with model={meta.base_model!r} or pick an adapter trained on "
                f"{self.model_ref!r}")
        return meta

    def _ensure_loaded(self, adapter: AdapterRef) -> str:
        name = f"a{adapter.adapter_id}"
        if name in self._adapters:
            self._adapters.move_to_end(name)
            return name
        meta = self.adapter_meta(adapter)
        self._adapters[name] = _Merged(meta, merged_lora_weights(self.model, adapter.path))
        while len(self._adapters) > self.max_adapters:
            old, _ = self._adapters.popitem(last=False)
            self._drop_prefix_kv(old)
        return name

    @contextlib.contextmanager
    def use(self, adapter: AdapterRef | None) -> Iterator[str | None]:
        """Make `adapter` (or the plain base model for None) the active weights inside the block.

        Yields:
            the adapter's key in the engine's caches (None for the base).
        """
        with self.lock:
            if adapter is None:
                yield None
                return
            name = self._ensure_loaded(adapter)
            modules = {m: self.model.get_submodule(m) for m in self._adapters[name].weights}
            base = {m: mod.weight for m, mod in modules.items()}
            try:
                for m, mod in modules.items():  # (out, in) tensors swapped in, the base's kept aside
                    mod.weight = self._adapters[name].weights[m]
                yield name
            finally:
                for m, mod in modules.items():
                    mod.weight = base[m]

    # ------------------------------------------------------------------ shared-prefix KV cache

    def prefix_kv(self, key: str | None, prefix_ids: list[int]) -> tuple:
        """Per-layer (keys, values) of the shared prompt prefix under the active weights, computed once.

        Call inside `use()` with the key it yielded.

        Returns:
            tuple over layers of (keys, values), each (1, kv_heads, prefix_len, head_dim).
        """
        cache_key = (key, tuple(prefix_ids))
        if cache_key in self._prefix_kv:
            self._prefix_kv.move_to_end(cache_key)
            return self._prefix_kv[cache_key]
        kv = self._prefix_kv[cache_key] = prefix_kv(self.model, prefix_ids)
        while len(self._prefix_kv) > 2 * (self.max_adapters + 1):
            self._prefix_kv.popitem(last=False)
        return kv

    def _drop_prefix_kv(self, key: str) -> None:
        for k in [k for k in self._prefix_kv if k[0] == key]:
            del self._prefix_kv[k]


_ENGINES: dict[tuple[str, str, str], InferenceEngine] = {}
_ENGINES_LOCK = threading.Lock()


def get_engine(model_ref: str, *, dtype: str = "auto", device: str = "auto",
               max_adapters: int = DEFAULT_MAX_ADAPTERS) -> InferenceEngine:
    """The process-wide engine for (model, dtype, device), loading the base model on first use.

    Raises:
        workers.modeling.registry.ModelNotFound: the model reference names no preset or checkpoint folder.
    """
    resolved_device = pick_device(device)
    key = (str(resolve_model(str(model_ref))), str(pick_dtype(dtype, resolved_device)), resolved_device)
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            engine = _ENGINES[key] = InferenceEngine(model_ref, dtype=dtype, device=device,
                                                     max_adapters=max_adapters)
        return engine


def clear_engines() -> None:
    """Forget cached engines (tests; frees their memory once nothing else holds them)."""
    with _ENGINES_LOCK:
        _ENGINES.clear()
