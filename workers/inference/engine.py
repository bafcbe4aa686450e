"""One base model in memory serving the base and several LoRA adapters, cached across jobs.

The base weights are loaded once per (model, dtype, device) and process; adapters are added to it
with PEFT's multi-adapter API (`load_adapter`, `set_adapter`, `disable_adapter`) and evicted least
recently used first (`delete_adapter`), so switching adapters between jobs never reloads the base.
"""
from __future__ import annotations

import contextlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from workers.modeling.forward import prefix_kv
from workers.models import load_model, model_digest, pick_device, pick_dtype, resolve_model

ADAPTER_META_FILE = "newslora.json"
DEFAULT_MAX_ADAPTERS = 4


class AdapterError(ValueError):
    """An adapter folder is missing, malformed, or was trained for another base model."""


@dataclass(frozen=True)
class AdapterRef:
    """A registered adapter: its model-artifact id and the folder holding the PEFT weights + newslora.json."""

    adapter_id: int
    path: Path


@dataclass(frozen=True)
class AdapterMeta:
    """What the trainer wrote into `newslora.json` next to the adapter weights."""

    template: str
    instruction: str | None
    label_names: list[str] | None
    base_model: str | None
    base_model_digest: str | None


def read_adapter_meta(path: Path) -> AdapterMeta:
    """Read and check an adapter folder's `newslora.json`.

    Accepted keys: `template`, `instruction`, `label_names`, the base model as `base_model` (a ref,
    or a dict with `ref` and `digest`) and its digest as `base_model_digest` (or `model_digest`).

    Raises:
        AdapterError: the folder, its PEFT config or its newslora.json is missing or unreadable.
    """
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter folder {path} does not exist: check the adapter's registered path "
                           f"(re-run the training job if its output was deleted)")
    if not (path / "adapter_config.json").is_file():
        raise AdapterError(f"{path} holds no adapter_config.json: it is not a PEFT adapter folder "
                           f"(save one with peft_model.save_pretrained())")
    meta_file = path / ADAPTER_META_FILE
    if not meta_file.is_file():
        raise AdapterError(f"{path} has no {ADAPTER_META_FILE}: newslora cannot tell which prompt template and "
                           f"base model the adapter was trained with; train it with newslora")
    try:
        raw = json.loads(meta_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterError(f"{meta_file} is not valid JSON ({e}); re-run the training job") from e
    base = raw.get("base_model")
    base_ref, digest = base, raw.get("base_model_digest") or raw.get("model_digest")
    if isinstance(base, dict):
        base_ref, digest = base.get("ref") or base.get("name"), digest or base.get("digest")
    if not raw.get("template"):
        raise AdapterError(f"{meta_file} names no prompt template; re-run the training job")
    return AdapterMeta(template=raw["template"], instruction=raw.get("instruction"),
                       label_names=raw.get("label_names"), base_model=base_ref, base_model_digest=digest)


class InferenceEngine:
    """The base model and tokenizer of one (model, dtype, device), plus up to `max_adapters` LoRA adapters.

    Use `get_engine()` rather than building one: it caches engines per process.

    Attributes:
        model: the Hugging Face causal LM (always the same object; PEFT injects LoRA layers into it).
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
        self.peft_model: Any = None  # the PeftModel wrapping self.model once an adapter is loaded
        self._adapters: OrderedDict[str, AdapterMeta] = OrderedDict()  # name -> meta, LRU order
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
        """The adapter's newslora.json, checked against this engine's base model.

        Raises:
            AdapterError: missing folder/files, or trained for another base model (digest differs).
        """
        meta = read_adapter_meta(adapter.path)
        if meta.base_model_digest is None:
            raise AdapterError(f"adapter {adapter.adapter_id} ({adapter.path}): newslora.json has no base model "
                               f"digest, so it cannot be checked against {self.model_ref!r}; retrain it with newslora")
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
        from peft import PeftModel
        if self.peft_model is None:
            self.peft_model = PeftModel.from_pretrained(self.model, str(adapter.path), adapter_name=name,
                                                        is_trainable=False)
        else:
            self.peft_model.load_adapter(str(adapter.path), adapter_name=name, is_trainable=False)
        # PEFT builds new LoRA weights in fp32 on the CPU; match the base's device and dtype.
        self.model.to(device=self.device, dtype=self.torch_dtype)
        self.model.eval()
        self._adapters[name] = meta
        while len(self._adapters) > self.max_adapters:
            old, _ = self._adapters.popitem(last=False)
            self.peft_model.delete_adapter(old)
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
                ctx = self.peft_model.disable_adapter() if self.peft_model is not None else contextlib.nullcontext()
                with ctx:
                    yield None
                return
            name = self._ensure_loaded(adapter)
            self.peft_model.set_adapter(name)
            yield name

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
        workers.models.ModelNotFound: the model reference names no preset or checkpoint folder.
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
