"""The parts of a causal LM that newslora calls directly, and the shared-prefix forward passes.

Works on a plain Hugging Face Llama-architecture model and on one wrapped by PEFT (LoRA layers are
injected in place, so the decoder found through `get_base_model()` runs the active adapter).
"""
from __future__ import annotations

import inspect
import weakref
from typing import Any

import torch
import torch.nn.functional as F


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


def left_padded(seqs, tail: list[int], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Rows left-padded so every sequence's last token sits in column S-1, then `tail` (the same tokens for
    every row: label branches, a score-token tree) in columns S.. .

    Returns:
        (ids (B, S + len(tail)) on `device`, lengths (B,) on `device`, S).
    """
    lens = torch.tensor([len(s) for s in seqs], device=device)  # (B,)
    S = int(lens.max())
    ids = torch.full((len(seqs), S + len(tail)), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, S - len(s):S] = torch.tensor(list(s), dtype=torch.long)
    if tail:
        ids[:, S:] = torch.tensor(tail, dtype=torch.long)
    return ids.to(device), lens, S


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


# ---------------------------------------------------------------- the lean CPU forward of score mode

class _Packed:
    """One layer stack's weights packed for the lean forward: per layer q|k|v (rows stacked) and gate|up.

    Built from the weights the modules hold now and kept while they are the same tensors, unmodified
    (weak references and version counters are checked on every use): an engine swapping an adapter's
    merged weights in gets that adapter's packing.
    """

    def __init__(self, decoder: Any):
        self.refs = [weakref.ref(w) for w in _packable(decoder)]
        self.versions = [w._version for w in _packable(decoder)]
        # normal tensors even when first asked for under inference_mode (score mode): the training forward
        # reuses the same packing with autograd on
        with torch.inference_mode(False), torch.no_grad():
            self.qkv = [torch.cat([lay.self_attn.q_proj.weight, lay.self_attn.k_proj.weight,
                                   lay.self_attn.v_proj.weight]).detach() for lay in decoder.layers]
            self.gate_up = [torch.cat([lay.mlp.gate_proj.weight, lay.mlp.up_proj.weight]).detach()
                            for lay in decoder.layers]

    def current(self, decoder: Any) -> bool:
        ws = _packable(decoder)
        return len(ws) == len(self.refs) and all(r() is w and w._version == v
                                                 for r, w, v in zip(self.refs, ws, self.versions))


_PACKS_KEPT = 2  # the base's and one adapter's: a worker alternating between them repacks nothing


def _packed_for(decoder: Any) -> _Packed:
    packs: list[_Packed] = decoder.__dict__.setdefault("_newslora_packs", [])
    for i, p in enumerate(packs):
        if p.current(decoder):
            packs.append(packs.pop(i))  # most recently used last
            return p
    packs.append(_Packed(decoder))
    del packs[:-_PACKS_KEPT]
    return packs[-1]


def _packable(decoder: Any) -> list[torch.Tensor]:
    return [m.weight for lay in decoder.layers for m in (lay.self_attn.q_proj, lay.self_attn.k_proj,
                                                         lay.self_attn.v_proj, lay.mlp.gate_proj, lay.mlp.up_proj)]


def layer_linears(layer: Any) -> tuple:
    """A Llama decoder layer's seven linear modules, in the order data flows: q, k, v, o, gate, up, down."""
    a, m = layer.self_attn, layer.mlp
    return a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj


def lean_forward_ok(decoder: Any) -> bool:
    """Whether `lean_forward` computes what this decoder computes (the same arithmetic with transformers' eager
    attention; within rounding of its SDPA): a plain Llama stack on the CPU (no PEFT layers, no biases, SiLU MLP,
    RMSNorm); anything else runs the Hugging Face forward."""
    cfg = getattr(decoder, "config", None)
    layers = getattr(decoder, "layers", None)
    if cfg is None or layers is None or getattr(cfg, "model_type", None) != "llama" \
            or not hasattr(decoder, "rotary_emb") or getattr(cfg, "hidden_act", None) != "silu" \
            or getattr(cfg, "pretraining_tp", 1) not in (None, 1) or decoder.embed_tokens.weight.device.type != "cpu":
        return False
    for lay in layers:
        if any(type(x) is not torch.nn.Linear or x.bias is not None for x in layer_linears(lay)) or any(
                type(n).__name__ != "LlamaRMSNorm" for n in (lay.input_layernorm, lay.post_attention_layernorm)):
            return False
    return True


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm exactly: normalised in fp32, rounded to the input's dtype, then scaled."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Matmul-softmax attention, as transformers' "eager" attention computes it (the PEFT trainer's on a CPU).

    q: (B, kv_heads, g * Q, d), already scaled, the g query heads of each key/value head stacked along the
    query axis (GQA without repeating keys); k, v: (B, kv_heads, K, d); bias: (B, 1, g * Q, K), 0 where a
    query sees a key, -inf elsewhere. Scores in q's dtype, softmax in fp32. On a 2-core CPU at score mode's
    shapes (K ~130) this takes ~0.55x the time of SDPA's flash kernel, whose blocking suits long sequences.
    """
    scores = torch.matmul(q, k.transpose(-1, -2))  # (B, kv_heads, g * Q, K)
    scores.add_(bias)
    return torch.matmul(torch.softmax(scores, -1, dtype=torch.float32).to(q.dtype), v)


def lean_forward(decoder: Any, ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
                 prefix_kv: tuple | None, weights: Any = None, *, start: tuple[int, torch.Tensor] | None = None,
                 stop: int | None = None) -> torch.Tensor:
    """The decoder's last hidden states for score mode, with fewer and larger kernels than its own forward.

    The same arithmetic as the Hugging Face Llama forward (RMSNorm in fp32, RoPE, transformers' eager attention
    (`_attention`) under the given mask, SiLU MLP) with q/k/v and gate/up each one matmul on packed weights,
    RoPE applied to q and k in one pass, residual adds in place, and the prefix's keys/values joined per layer
    without a cache object. Check `lean_forward_ok(decoder)` first.

    Args:
        ids: (B, Q) token ids; position_ids: (B, Q); mask: (B, 1, Q, P + Q) bool, True where a query sees a key;
        prefix_kv: per layer (keys, values), each (1, kv_heads, P, head_dim), or None (P = 0).
        weights: per-layer matrices to use instead of the modules' own (`lora_forward.merged_weights`: a
            LoRA model's weights with the adapter merged, without touching its modules): attributes qkv,
            gate_up, o, down, lists over layers.
        start: (k, x): begin at layer k from x (B, Q, H), the residual stream a call with `stop=k` returned
            for the same ids, positions, mask and prefix (layers below k unchanged since).
        stop: end after layer stop - 1 and return the residual stream there, before any norm.

    Returns:
        (B, Q, H) hidden states after the final norm (with `stop`: the residual stream after that layer).
    """
    cfg = decoder.config
    packed = weights if weights is not None else _packed_for(decoder)
    nh, kvh = cfg.num_attention_heads, cfg.num_key_value_heads
    eps = cfg.rms_norm_eps
    first, x = start if start is not None else (0, decoder.embed_tokens(ids))  # x: (B, Q, H)
    last = len(decoder.layers) if stop is None else stop
    B, Q, H = x.shape
    d = getattr(cfg, "head_dim", None) or H // nh
    cos, sin = decoder.rotary_emb(x, position_ids)  # (B, Q, d)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, Q, d)
    g = nh // kvh  # query heads per key/value head
    bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(~mask, float("-inf"))
    bias = bias.repeat(1, 1, g, 1)  # (B, 1, g * Q, P + Q): the g heads' queries stacked, as `_attention` takes them
    for li in range(first, last):
        lay = decoder.layers[li]
        attn = lay.self_attn
        h = _rms(x, lay.input_layernorm.weight, eps)
        qkv = F.linear(h, packed.qkv[li]).view(B, Q, nh + 2 * kvh, d).transpose(1, 2)  # (B, heads, Q, d)
        qk = qkv[:, :nh + kvh]
        qk = qk * cos + _rotate_half(qk) * sin
        q, k, v = qk[:, :nh], qk[:, nh:], qkv[:, nh + kvh:]
        if prefix_kv is not None:
            pk, pv = prefix_kv[li]
            k = torch.cat([pk.expand(B, -1, -1, -1), k], dim=2)  # (B, kv_heads, P + Q, d)
            v = torch.cat([pv.expand(B, -1, -1, -1), v], dim=2)
        # the scale on q (exact for a power-of-two scale: SmolLM2's 1/8), written contiguous in the same pass
        qs = torch.mul(q, attn.scaling, out=torch.empty(B, nh, Q, d, dtype=q.dtype, device=q.device))
        o = _attention(qs.view(B, kvh, g * Q, d), k, v, bias)  # (B, kv_heads, g * Q, d)
        o = o.view(B, nh, Q, d).transpose(1, 2).reshape(B, Q, nh * d)
        x = x + (attn.o_proj(o) if weights is None else F.linear(o, weights.o[li]))
        h = _rms(x, lay.post_attention_layernorm.weight, eps)
        gate, up = F.linear(h, packed.gate_up[li]).chunk(2, dim=-1)  # (B, Q, I) each
        act = F.silu(gate) * up
        x = x + (lay.mlp.down_proj(act) if weights is None else F.linear(act, weights.down[li]))
    return x if stop is not None else _rms(x, decoder.norm.weight, eps)
