"""What the benches count: the work a pass executed (`Work`), its FLOPs (`FlopModel`), and the machine's
measured bf16 matmul peak (`matmul_gflops`), shared by `bench/train_throughput.py` (LoRA training steps)
and `bench/infer_throughput.py` (score-mode classification), so both fractions of the peak are counted
one way.

FLOPs of the work executed (padding excluded, so never more than was computed):
- decoder linear layers, frozen: forward 2*N a token; in training, backward activation gradients 2*N for
  the modules whose input needs a gradient (none below the lowest adapted layer, none for that layer's
  q|k|v; no weight gradients); N = the decoder's linear parameters (embedding and LM head apart);
- LoRA adapters (training; inference serves them merged into the linear weights, so they cost nothing
  extra): forward 2*N_lora, backward weight gradients 2*N_lora, dy @ B, and du @ A where the input needs a
  gradient (6*N_lora a token in all but the lowest adapted layer);
- attention: QK^T and AV forward 4*d a key, backward 8*d where its input needs a gradient, over the causal
  keys each executed token is allowed to see (d = hidden size; a shared prefix's keys included);
- LM head (tied): 2*V*H a position where it is applied, twice that in training (the activation gradient).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch


def matmul_gflops(dtype: torch.dtype, sizes: Sequence[int] = (1024, 2048), reps: int = 12) -> float:
    """A peak: the fastest single n x n matmul over a few sizes. The size matters on this CPU (bf16 AMX:
    ~1.7 TFLOP/s at 1024, ~0.8 at 2048, whose operands outgrow the cache), and one call is less likely
    than a run of calls to be interrupted by other work."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return best


def _linear_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear module of a Llama decoder layer."""
    h = config.hidden_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, config.intermediate_size), "up_proj": (h, config.intermediate_size),
            "down_proj": (config.intermediate_size, h)}


def shape_ceiling_gflops(model_dir: Path, tokens: int, reps: int = 5) -> float:
    """GFLOP/s of the decoder's frozen linear layers alone at `tokens` rows in bf16: each layer's forward
    x @ W^T and activation gradient dy @ W, the fastest of `reps` passes over all of them."""
    from transformers import AutoConfig
    ops = []
    for i, o in _linear_shapes(AutoConfig.from_pretrained(model_dir)).values():
        x, w, g = (torch.randn(tokens, i, dtype=torch.bfloat16), torch.randn(o, i, dtype=torch.bfloat16),
                   torch.randn(tokens, o, dtype=torch.bfloat16))
        ops.append((x, w, g))
    flops = sum(4 * tokens * w.shape[0] * w.shape[1] for _, w, _ in ops)
    best = float("inf")
    for _ in range(reps + 1):
        t = time.perf_counter()
        for x, w, g in ops:
            torch.nn.functional.linear(x, w)
            g @ w
        best = min(best, time.perf_counter() - t)
    return flops / best / 1e9


@dataclass
class Work:
    """Counts over one or more passes (see the module docstring)."""

    data_tokens: int = 0
    executed_tokens: int = 0
    padded_tokens: int = 0
    head_positions: int = 0  # LM-head rows, padding excluded
    attn_keys: int = 0  # sum over executed tokens of the causal keys each attends to

    def __iadd__(self, other: "Work") -> "Work":
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)
        return self


def score_batch_work(lengths: Sequence[int], prefix_len: int, branches: Sequence[Sequence[int]]) -> Work:
    """One score-mode forward (`workers.modeling.scoring.score_labels`): each row's body on top of the
    shared prefix's cached keys (the prefix itself is not run again), every label's branch tokens after
    it, the LM head at the last prompt token and at each branch token.

    Args:
        lengths: each row's body tokens (what follows the prefix); prefix_len: P (0 without a cache);
        branches: the label branches appended to every row (`PromptCodec.plan.branches`).
    """
    B, S, Bt = len(lengths), max(lengths), sum(len(b) for b in branches)
    # a body token j (1-based) sees the prefix and j body keys; branch token s (1-based) of a branch sees
    # the prefix, the whole body and s keys of its own branch
    branch_keys = sum(s for b in branches for s in range(1, len(b) + 1))
    attn = sum(n * prefix_len + n * (n + 1) // 2 + Bt * (prefix_len + n) + branch_keys for n in lengths)
    return Work(data_tokens=sum(lengths), executed_tokens=sum(lengths) + B * Bt, padded_tokens=B * (S + Bt),
                head_positions=B * (1 + Bt), attn_keys=attn)


@dataclass(frozen=True)
class FlopModel:
    """FLOPs a token costs, per part, counting only what runs: in training, below the lowest adapted layer
    (`lora.top_layers`) nothing needs a gradient, and in that layer a module's activation gradient is
    computed only when something adapted feeds its input; in inference (`forward_only`) nothing does."""
    linear_fwd: int  # decoder linear parameters (forward: 2 FLOPs each a token)
    linear_bwd: int  # frozen linear parameters whose input needs a gradient (activation gradient: 2 each)
    lora_fwd: int  # LoRA parameters (A and B of every adapted module)
    lora_bwd: int  # FLOPs/2 of the LoRA backward a token: weight gradients, dy @ B, and du @ A where needed
    hidden: int
    vocab: int
    attn_fwd_layers: int
    attn_bwd_layers: int  # layers whose attention input needs a gradient
    head_passes: int = 2  # LM head matmuls a position: forward, and in training its activation gradient

    @classmethod
    def of(cls, model_dir: Path, lora: Any, *, frozen_kept: bool = False) -> "FlopModel":
        """A LoRA training step's (see the class docstring). frozen_kept: the layers below the lowest adapted
        one are not run in the step (their output kept once an example: workers/train/frozen_cache.py)."""
        from transformers import AutoConfig
        c = AutoConfig.from_pretrained(model_dir)
        shapes = _linear_shapes(c)
        # modules in the order data flows through a layer; each group reads what the groups before it made
        groups = [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)]
        targets = set(shapes) if list(lora.target_modules) == ["all-linear"] else set(lora.target_modules)
        n_layers, r = c.num_hidden_layers, lora.rank
        lowest = min(lora.adapted_layers(n_layers) or [0])  # the trainer's own range of adapted layers
        lin_f = lin_b = lo_f = lo_b = attn_b = 0
        first = lowest if frozen_kept else 0
        for layer in range(first, n_layers):
            grad_in = layer > lowest  # the residual stream needs a gradient above the lowest adapted layer
            for gi, group in enumerate(groups):
                for name in group:
                    i, o = shapes[name]
                    lin_f += i * o
                    lin_b += i * o if grad_in else 0
                    if layer >= lowest and name in targets:
                        lo_f += r * (i + o)
                        lo_b += r * (i + o) + r * o + (r * i if grad_in else 0)
                if gi == 0:
                    attn_b += 1 if grad_in or (layer == lowest and targets & set(group)) else 0
                if layer >= lowest and targets & set(group):
                    grad_in = True
        return cls(linear_fwd=lin_f, linear_bwd=lin_b, lora_fwd=lo_f, lora_bwd=lo_b, hidden=c.hidden_size,
                   vocab=c.vocab_size, attn_fwd_layers=n_layers - first, attn_bwd_layers=attn_b)

    @classmethod
    def forward_only(cls, model_dir: Path) -> "FlopModel":
        """Inference: the forward alone (an adapter served merged into the linear weights adds nothing)."""
        from transformers import AutoConfig
        c = AutoConfig.from_pretrained(model_dir)
        lin = c.num_hidden_layers * sum(i * o for i, o in _linear_shapes(c).values())
        return cls(linear_fwd=lin, linear_bwd=0, lora_fwd=0, lora_bwd=0, hidden=c.hidden_size, vocab=c.vocab_size,
                   attn_fwd_layers=c.num_hidden_layers, attn_bwd_layers=0, head_passes=1)

    def flops(self, w: Work) -> float:
        return (w.executed_tokens * 2 * (self.linear_fwd + self.linear_bwd + self.lora_fwd + self.lora_bwd)
                + w.attn_keys * self.hidden * (4 * self.attn_fwd_layers + 8 * self.attn_bwd_layers)
                + w.head_positions * 2 * self.head_passes * self.vocab * self.hidden)
