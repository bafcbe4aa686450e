"""The parts of a causal LM that newslora calls directly, and the shared-prefix forward passes.

Works on a plain Hugging Face Llama-architecture model and on one wrapped by PEFT (LoRA layers are
injected in place, so the decoder found through `get_base_model()` runs the active adapter).
"""
from __future__ import annotations

import inspect
from typing import Any

import torch


def base_of(model: Any) -> Any:
    """The Hugging Face model under a PeftModel (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_of(model: Any) -> Any:
    """The decoder stack without the LM head (LlamaModel): hidden states out, final norm applied."""
    return base_of(model).get_decoder()


def lm_head_of(model: Any) -> Any:
    return base_of(model).get_output_embeddings()


def cache_kwarg(decoder: Any) -> str:
    """transformers >= 5.2x calls the key/value cache argument `cache`; earlier 5.x `past_key_values`."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def returned_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def prefix_kv(model: Any, prefix_ids: list[int]) -> tuple:
    """Per-layer (keys, values) of a shared prompt prefix under the model's active weights.

    Returns:
        tuple over layers of (keys, values), each (1, kv_heads, prefix_len, head_dim).
    """
    decoder = decoder_of(model)
    device = lm_head_of(model).weight.device
    ids = torch.tensor([prefix_ids], device=device)  # (1, P)
    with torch.inference_mode():
        out = decoder(input_ids=ids, use_cache=True)
    return tuple((layer.keys, layer.values) for layer in returned_cache(out).layers)


def expanded_cache(kv: tuple | None, batch: int):
    """A DynamicCache holding a prefix's KV expanded to `batch` rows (None without a prefix)."""
    from transformers import DynamicCache
    if kv is None:
        return None
    # (1, kv_heads, P, head_dim) -> (batch, kv_heads, P, head_dim); the cache's first update copies.
    return DynamicCache([(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in kv])


def shared_prefix_hidden(model: Any, prefix_ids: torch.Tensor, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Run the prefix once, then every row's tokens on top of its keys/values (differentiable: training).

    Args:
        prefix_ids: (1, P); input_ids: (B, S); attention_mask: (B, P + S); position_ids: (B, S) or None
            (then P .. P + S - 1).

    Returns:
        (prefix hidden (1, P, H), row hidden (B, S, H), the cache holding P + S keys/values per row).
    """
    decoder = decoder_of(model)
    out = decoder(input_ids=prefix_ids, use_cache=True)
    cache = returned_cache(out)
    cache.batch_repeat_interleave(input_ids.shape[0])  # (1, kv, P, d) -> (B, kv, P, d), differentiable
    rows = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=True, **{cache_kwarg(decoder): cache})
    return out.last_hidden_state, rows.last_hidden_state, cache
