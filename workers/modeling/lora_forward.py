"""The shared-prefix training forward of a PEFT-LoRA Llama on the CPU, in fewer and larger kernels.

The same arithmetic as `forward.shared_prefix_hidden` through PEFT's LoRA layers (RMSNorm in fp32, RoPE,
eager attention with an fp32 softmax, SiLU MLP, `base(x) + B(A(x)) * scaling` on every adapted layer),
differentiable in the LoRA weights, but:
- q|k|v and gate|up each run as one frozen matmul on weights packed once (the frozen base does not change
  while training), and their LoRA parts as one `A` matmul (the layers' A matrices stacked) and one `B`
  matmul (their B matrices, pre-scaled, as a block-diagonal matrix), instead of three and two PEFT modules
  of three kernels each;
- RoPE on q and k in one pass, the prefix's keys/values joined per layer without a cache object;
- no PEFT dispatch, dropout identity or dtype round trips on the way.

Measured on SmolLM2-135M, 2 cores: see `bench/train_throughput.py` (the newslora loop uses this).
`lora_forward_ok(model)` says whether it applies (a plain Llama under one active LoRA adapter without
dropout, bias or DoRA, on the CPU); otherwise the trainer runs `forward.shared_prefix_hidden`.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from workers.modeling.forward import _packed_for, _rms, _rotate_half, decoder_of, layer_linears

_QKV = ("q_proj", "k_proj", "v_proj")
_GATE_UP = ("gate_proj", "up_proj")


def _lora_layer(module: Any) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A")


def lora_forward_ok(model: Any) -> bool:
    """Whether `lora_shared_prefix_hidden` computes exactly what the PEFT model computes."""
    if not hasattr(model, "peft_config") or len(getattr(model, "active_adapters", []) or []) != 1:
        return False
    adapter = model.active_adapters[0]
    decoder = decoder_of(model)
    cfg = getattr(decoder, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) != "llama" or getattr(cfg, "hidden_act", None) != "silu" \
            or getattr(cfg, "pretraining_tp", 1) not in (None, 1) or not hasattr(decoder, "rotary_emb") \
            or decoder.embed_tokens.weight.device.type != "cpu":
        return False
    for lay in decoder.layers:
        if any(type(n).__name__ != "LlamaRMSNorm" for n in (lay.input_layernorm, lay.post_attention_layernorm)):
            return False
        for x in layer_linears(lay):
            if _lora_layer(x):
                if (x.merged or x.disable_adapters or adapter not in x.lora_A
                        or type(x.lora_dropout[adapter]) is not torch.nn.Identity
                        or x.use_dora.get(adapter) or x.base_layer.bias is not None
                        or type(x.base_layer) is not torch.nn.Linear or x.lora_A[adapter].bias is not None
                        or x.lora_B[adapter].bias is not None):
                    return False
            elif type(x) is not torch.nn.Linear or x.bias is not None:
                return False
    return True


def _lora_delta_weights(modules: list[Any], adapter: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A stacked (sum r, in), B block-diagonal and scaled (sum out, sum r)) of the adapted modules among
    `modules`, zero blocks for the others; None when none is adapted."""
    if not any(_lora_layer(m) for m in modules):
        return None
    As, Bs = [], []
    for m in modules:
        if _lora_layer(m):
            As.append(m.lora_A[adapter].weight)
            Bs.append(m.lora_B[adapter].weight * m.scaling[adapter])
        else:
            out = m.weight.shape[0]
            Bs.append(torch.zeros(out, 0, dtype=torch.float32, device=m.weight.device))
    return torch.cat(As), torch.block_diag(*Bs)


def _linear(x: torch.Tensor, weight: torch.Tensor, lora: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    y = F.linear(x, weight)
    if lora is not None:
        y = y + F.linear(F.linear(x, lora[0]), lora[1])
    return y


def _single(m: Any, adapter: str) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    if _lora_layer(m):
        return m.base_layer.weight, (m.lora_A[adapter].weight, m.lora_B[adapter].weight * m.scaling[adapter])
    return m.weight, None


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """Eager attention as the Hugging Face Llama runs it (fp32 softmax), grouped-query without copying the
    keys/values per head: each key/value head's query heads are stacked along the query axis instead.

    Args:
        q: (n, heads, T, d); k, v: (n, kv_heads, K, d); bias: (n or 1, 1, T, K) additive, fp32.
    """
    n, nh, T, d = q.shape
    kvh, K = k.shape[1], k.shape[2]
    g = nh // kvh
    w = torch.matmul(q.reshape(n, kvh, g * T, d), k.transpose(2, 3)) * scale  # (n, kvh, g*T, K)
    w = w.view(n, kvh, g, T, K) + bias.unsqueeze(1)
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype).view(n, kvh, g * T, K)
    return torch.matmul(w, v).view(n, nh, T, d)


class MergedWeights:
    """Per-layer weights of a LoRA model with its adapter merged, for `forward.lean_forward` (scoring)."""

    def __init__(self, qkv: list, gate_up: list, o: list, down: list):
        self.qkv, self.gate_up, self.o, self.down = qkv, gate_up, o, down


def merge_lora(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale * B @ A, summed in fp32 and rounded once to W's dtype, on W's device, W left as it is: how
    newslora merges a LoRA pair everywhere (a classify job's adapter, training validation). In fp32 even
    when called under autocast.

    Args:
        w: (out, in); a: (r, in); b: (out, r).
    """
    with torch.no_grad(), torch.autocast(w.device.type, enabled=False):
        delta = (b.float() @ a.float()) * scale
        return (w.detach().float() + delta.to(w.device)).to(w.dtype)


@torch.no_grad()
def merged_weights(model: Any) -> MergedWeights:
    """The decoder's linear weights with the active adapter merged as a classify job merges an adapter
    (`merge_lora`), computed aside: the modules and their weights are left as they are (a merge and unmerge
    in bf16 would drift the frozen base). Check `lora_forward_ok(model)` first."""
    adapter = model.active_adapters[0]

    def merged(m: Any) -> torch.Tensor:
        if not _lora_layer(m):
            return m.weight
        return merge_lora(m.base_layer.weight, m.lora_A[adapter].weight, m.lora_B[adapter].weight, m.scaling[adapter])

    layers = decoder_of(model).layers
    return MergedWeights(
        qkv=[torch.cat([merged(getattr(lay.self_attn, n)) for n in _QKV]) for lay in layers],
        gate_up=[torch.cat([merged(getattr(lay.mlp, n)) for n in _GATE_UP]) for lay in layers],
        o=[merged(lay.self_attn.o_proj) for lay in layers], down=[merged(lay.mlp.down_proj) for lay in layers])


def frozen_layers(model: Any) -> int:
    """How many of the decoder's bottom layers hold no LoRA weight (0 when the first layer is adapted): their
    output depends on the tokens only, so a trainer may compute it once an example
    (`workers.train.frozen_cache`) and start every later step above them."""
    n = 0
    for lay in decoder_of(model).layers:
        if any(_lora_layer(m) for m in layer_linears(lay)):
            break
        n += 1
    return n


def rows_see(attention_mask: torch.Tensor, P: int) -> torch.Tensor:
    """Which keys each row token of a training batch attends to: the whole prefix, its own earlier real tokens
    and itself (a pad query sees itself only, so no row of the softmax is empty).

    Args:
        attention_mask: (B, P + S), 1 on the prefix and real tokens (`collate_train`).

    Returns:
        (B, S, P + S) bool.
    """
    B, S = attention_mask.shape[0], attention_mask.shape[1] - P
    dev = attention_mask.device
    real = attention_mask[:, P:].bool()  # (B, S)
    causal = torch.ones(S, S, dtype=torch.bool, device=dev).tril()
    see = (causal.unsqueeze(0) & real.unsqueeze(1)) | torch.eye(S, dtype=torch.bool, device=dev).unsqueeze(0)
    return torch.cat([attention_mask[:, :P].bool().unsqueeze(1).expand(B, S, P), see], dim=2)


class _Layout:
    """Where the prefix's and the rows' tokens sit in the token matrix (P + B*S rows), their rotary angles and
    the two attention masks: what every layer of `lora_shared_prefix_hidden` shares."""

    def __init__(self, decoder: Any, P: int, B: int, S: int, attention_mask: torch.Tensor, dev: torch.device,
                 dtype: torch.dtype):
        cfg = decoder.config
        self.P, self.B, self.S = P, B, S
        self.nh, self.kvh, self.eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rms_norm_eps
        H = cfg.hidden_size
        self.d = getattr(cfg, "head_dim", None) or H // self.nh
        probe = torch.empty(1, 1, H, dtype=dtype, device=dev)  # rotary_emb reads only dtype and device
        cos, sin = decoder.rotary_emb(probe, torch.arange(P + S, device=dev).unsqueeze(0))  # (1, P + S, d)
        tok_pos = torch.cat([torch.arange(P, device=dev), torch.arange(P, P + S, device=dev).repeat(B)])  # (N,)
        self.cos, self.sin = cos[0, tok_pos].unsqueeze(1), sin[0, tok_pos].unsqueeze(1)  # (N, 1, d)
        # Additive masks in fp32: the prefix is causal; the rows see what `rows_see` says.
        neg = torch.finfo(torch.float32).min
        causal_p = torch.ones(P, P, dtype=torch.bool, device=dev).tril()
        self.bias_p = torch.zeros(1, 1, P, P, device=dev).masked_fill(~causal_p, neg)
        see = rows_see(attention_mask, P)  # (B, S, P + S)
        self.bias_r = torch.zeros(B, 1, S, P + S, device=dev).masked_fill(~see.unsqueeze(1), neg)

    def split(self, t: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, heads, d) -> prefix (1, heads, P, d), rows (B, heads, S, d)."""
        P, B, S = self.P, self.B, self.S
        return t[:P].transpose(0, 1).unsqueeze(0), t[P:].view(B, S, heads, self.d).transpose(1, 2)


def _run_layers(model: Any, x: torch.Tensor, lay_out: _Layout, layers: range) -> torch.Tensor:
    """The residual stream (N, H) through the decoder layers `layers`."""
    adapter = model.active_adapters[0]
    decoder = decoder_of(model)
    pack = _packed_for(decoder)  # q|k|v and gate|up of the frozen base (PEFT layers' .weight is the base's)
    nh, kvh, d, eps = lay_out.nh, lay_out.kvh, lay_out.d, lay_out.eps
    P, B, S = lay_out.P, lay_out.B, lay_out.S
    N = x.shape[0]
    split = lay_out.split
    for li in layers:
        lay = decoder.layers[li]
        attn, mlp = lay.self_attn, lay.mlp
        qkv_lora = _lora_delta_weights([getattr(attn, n) for n in _QKV], adapter)
        gu_lora = _lora_delta_weights([getattr(mlp, n) for n in _GATE_UP], adapter)
        o_w, o_lora = _single(attn.o_proj, adapter)
        down_w, down_lora = _single(mlp.down_proj, adapter)

        qkv = _linear(_rms(x, lay.input_layernorm.weight, eps), pack.qkv[li], qkv_lora).view(N, nh + 2 * kvh, d)
        qk = qkv[:, :nh + kvh]
        qk = qk * lay_out.cos + _rotate_half(qk) * lay_out.sin  # (N, nh + kvh, d)
        (qp, q), (kp, k), (vp, v) = split(qk[:, :nh], nh), split(qk[:, nh:], kvh), split(qkv[:, nh + kvh:], kvh)
        op = _attend(qp, kp, vp, lay_out.bias_p, attn.scaling)  # (1, nh, P, d)
        k = torch.cat([kp.expand(B, -1, -1, -1), k], dim=2)  # (B, kvh, P + S, d)
        v = torch.cat([vp.expand(B, -1, -1, -1), v], dim=2)
        o = _attend(q, k, v, lay_out.bias_r, attn.scaling)  # (B, nh, S, d)
        o = torch.cat([op[0].transpose(0, 1).reshape(P, nh * d), o.transpose(1, 2).reshape(B * S, nh * d)])
        x = x + _linear(o, o_w, o_lora)
        gate, up = _linear(_rms(x, lay.post_attention_layernorm.weight, eps), pack.gate_up[li], gu_lora).chunk(2, -1)
        x = x + _linear(F.silu(gate) * up, down_w, down_lora)
    return x


def lora_shared_prefix_hidden(model: Any, prefix_ids: torch.Tensor, input_ids: torch.Tensor,
                              attention_mask: torch.Tensor, *, frozen: tuple[int, torch.Tensor] | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """`forward.shared_prefix_hidden` for a PEFT-LoRA Llama on the CPU (check `lora_forward_ok` first).

    The prefix's tokens and the rows' tokens go through every linear layer, norm and MLP as one token
    matrix (P + B*S rows): only attention tells them apart (the prefix causal on itself, each row on the
    prefix's keys and its own). Half the kernels of running the prefix as a batch of its own.

    Args:
        prefix_ids: (1, P); input_ids: (B, S) right-padded; attention_mask: (B, P + S), 1 on real tokens.
        frozen: (k, x): start at layer k from x (P + B*S, H), the residual stream of these tokens after the
            first k layers (`FrozenCache.stream`; its pad rows may hold anything finite: no real token sees them).

    Returns:
        (prefix hidden (1, P, H), row hidden (B, S, H)), after the final norm.
    """
    decoder = decoder_of(model)
    P, (B, S) = prefix_ids.shape[1], input_ids.shape
    if frozen is None:
        start, x = 0, decoder.embed_tokens(torch.cat([prefix_ids[0], input_ids.reshape(-1)]))  # (N, H)
    else:
        start, x = frozen
    lay_out = _Layout(decoder, P, B, S, attention_mask, x.device, x.dtype)
    x = _run_layers(model, x, lay_out, range(start, len(decoder.layers)))
    x = _rms(x, decoder.norm.weight, lay_out.eps)
    return x[:P].unsqueeze(0), x[P:].view(B, S, x.shape[-1])
