"""The frozen bottom layers' output, kept once an example: LoRA on the top layers only (`lora.top_layers`).

With LoRA on the top N layers, the layers below hold no trainable weight, so what they output for an example
depends on its tokens alone: the same at every step and every epoch. The trainer computes it once an example
before its first step (`build_frozen_cache`, no gradient, in length-sorted batches) and then runs only the
adapted layers a step (`FrozenCache.stream` gives the token matrix `lora_forward.lora_shared_prefix_hidden`
starts from). With the full preset's top 10 of 30 layers a step then skips two thirds of its forward pass.

Memory: one hidden vector per real token, in the model's dtype (AG News, 7,557 articles of ~60 tokens after
the shared prefix, SmolLM2's 576 dims in bf16: ~0.5 GB); `frozen_cache_bytes` says what a dataset needs so the
trainer can decline above `train.frozen_cache_gb`.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Sequence

import torch

from workers.modeling.codec import Example
from workers.modeling.forward import decoder_of, lean_forward, prefix_kv
from workers.modeling.lora_forward import rows_see
from workers.train.data import TrainBatch, collate_train


class FrozenCache:
    """The residual stream after the first `layers` decoder layers: the shared prefix's, and each example's
    tokens after it."""

    def __init__(self, layers: int, prefix: torch.Tensor, rows: list[torch.Tensor]):
        self.layers = layers
        self.prefix = prefix  # (P, H)
        self.rows = rows  # per example (n_i, H): its tokens after the prefix, no padding

    def stream(self, batch: TrainBatch, indices: Sequence[int]) -> tuple[int, torch.Tensor]:
        """(layers, the token matrix (P + B*S, H) of `batch`, whose rows are the examples `indices`); pad
        positions hold zeros (no real token attends to them, and they carry no target)."""
        P = self.prefix.shape[0]
        B, S = batch.input_ids.shape
        x = self.prefix.new_zeros(P + B * S, self.prefix.shape[1])
        x[:P] = self.prefix
        for b, i in enumerate(indices):
            row = self.rows[i]
            x[P + b * S:P + b * S + row.shape[0]] = row
        return self.layers, x

    def nbytes(self) -> int:
        return sum(r.numel() * r.element_size() for r in [self.prefix, *self.rows])


def frozen_cache_bytes(examples: Sequence[Example], hidden: int, dtype: torch.dtype) -> int:
    """Bytes a `FrozenCache` of these examples holds."""
    if not examples:
        return 0
    P = examples[0].prefix_len
    tokens = P + sum(len(e.input_ids) - P for e in examples)
    return tokens * hidden * torch.empty(0, dtype=dtype).element_size()


def build_frozen_cache(model: Any, examples: Sequence[Example], layers: int, *, pad_id: int, batch_size: int = 32,
                       compute: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                       progress: Callable[[int, int, float], None] | None = None) -> FrozenCache:
    """Run every example through the first `layers` layers once (no gradient), in batches of similar length.

    Score mode's forward does it (`forward.lean_forward`: each row on the prefix's keys/values, computed once):
    the arithmetic of the training forward, whose output it equals bitwise here at 1.1-1.25x its speed (SmolLM2,
    2 cores, bf16; the training forward runs the prefix again in every batch, in autograd's layout).

    Args:
        compute: the context the training step runs its forward in (autocast), so the kept output is what
            the step would compute.
        progress: called as (examples done, of, seconds so far) after each batch.
    """
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    rows: list[torch.Tensor | None] = [None] * len(examples)
    started = time.perf_counter()
    P = examples[0].prefix_len
    with compute():
        prefix, kv = _lean_prefix(model, examples[0].input_ids[:P], layers)
    for at in range(0, len(order), batch_size):
        idx = order[at:at + batch_size]
        batch = collate_train([examples[i] for i in idx], pad_id)
        with compute():
            body = _lean_rows(model, batch, kv, layers)
        for b, i in enumerate(idx):
            rows[i] = body[b, :len(examples[i].input_ids) - P].clone()
        if progress is not None:
            progress(min(at + batch_size, len(order)), len(order), time.perf_counter() - started)
    return FrozenCache(layers, prefix, rows)


def _lean_prefix(model: Any, prefix: Sequence[int], layers: int) -> tuple[torch.Tensor, tuple]:
    """(the prefix's residual stream after `layers` layers (P, H), its per-layer keys/values)."""
    decoder = decoder_of(model)
    P = len(prefix)
    kv = prefix_kv(model, list(prefix))
    ids = torch.tensor([list(prefix)])
    causal = torch.ones(P, P, dtype=torch.bool).tril().view(1, 1, P, P)
    with torch.inference_mode():
        x = lean_forward(decoder, ids, torch.arange(P).unsqueeze(0), causal, None, stop=layers)
    return x[0].clone(), kv


def _lean_rows(model: Any, batch: TrainBatch, kv: tuple, layers: int) -> torch.Tensor:
    """The rows' residual stream after `layers` layers (B, S, H): each row's tokens on the prefix's keys."""
    P = batch.prefix_ids.shape[1]
    B, S = batch.input_ids.shape
    mask = rows_see(batch.attention_mask, P).unsqueeze(1)  # (B, 1, S, P + S): what the training step's rows see
    pos = torch.arange(P, P + S).expand(B, S)
    with torch.inference_mode():
        return lean_forward(decoder_of(model), batch.input_ids, pos, mask, kv, stop=layers)
