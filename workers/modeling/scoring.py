"""Label scoring: every label's log-likelihood after each prompt, in one forward pass per batch.

The pass runs over each item's body on top of the shared prefix's key/value cache (computed once per
model, adapter and prefix: `workers.modeling.forward.prefix_kv`), with every multi-token label's
continuation appended to the same pass under a custom attention mask, and applies the LM head only at
the few positions whose next token is a label token. Training validation and classification both
call `score_labels`, so validation accuracy and a classify job's accuracy are one computation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from workers.modeling.codec import PromptCodec
from workers.modeling.forward import (cache_kwarg, decoder_of, expanded_cache, lean_forward, left_padded,
                                     lean_forward_ok, lm_head_of)


class FrozenStreams:
    """The residual stream after the first `layers` decoder layers, kept per batch of prompts: for scoring the
    same prompts again and again (training validation) while those layers do not change (LoRA on the layers
    above only). Each later pass runs only the layers above (the lean forward)."""

    def __init__(self, layers: int):
        self.layers = layers
        self.kept: dict[tuple, torch.Tensor] = {}

    def stream(self, decoder: Any, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, prefix_kv: tuple | None,
               weights: Any) -> tuple[int, torch.Tensor]:
        key = (tuple(ids.flatten().tolist()), tuple(ids.shape))  # the same tokens in the same layout
        if key not in self.kept:
            self.kept[key] = lean_forward(decoder, ids, pos, mask, prefix_kv, weights, stop=self.layers)
        return self.layers, self.kept[key]


def score_labels(model: Any, codec: PromptCodec, seqs: Sequence[Sequence[int]], prefix_kv: tuple | None, *,
                 pad_id: int | None = None, weights: Any = None, with_eos: bool = False,
                 frozen: FrozenStreams | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-likelihood of every label's token sequence after each item's prompt, one forward pass.

    Args:
        model: the causal LM (plain or PEFT-wrapped), with the weights to score under active.
        seqs: per-item prompt tokens after the shared prefix (the whole prompt when `prefix_kv` is None).
        prefix_kv: the shared prefix's per-layer KV (`forward.prefix_kv`), or None.
        weights: a LoRA model's merged weights (`lora_forward.merged_weights`): the lean forward runs on them.
        with_eos: also read log p(EOS | prompt, label) for every label (the rest of a training response),
            in the same forward: a few more branch columns.
        frozen: where the bottom layers' output for these prompts is kept (lean forward only): computed on
            the first call, reused on the next ones.

    Returns:
        float32 tensor (batch, n_labels) on the CPU: sum over each label's tokens of
        log p(token | prompt, earlier tokens); with `with_eos`, (that, the EOS terms (batch, n_labels)).
    """
    decoder, head = decoder_of(model), lm_head_of(model)
    device = head.weight.device
    pad_id = codec.tokenizer.pad_token_id if pad_id is None else pad_id
    B = len(seqs)
    P = len(codec.prefix_ids) if prefix_kv is not None else 0
    plan = codec.eos_plan if with_eos else codec.plan
    if plan is None:
        raise ValueError("the tokenizer has no EOS token: with_eos scoring needs one")
    Bt = plan.branch_len
    # Rows are left-padded so that every item's last prompt token sits in column S-1 and the
    # label branches (identical for all items) in columns S..Q-1.
    ids, lens, S = left_padded(seqs, [t for branch in plan.branches for t in branch], pad_id, device)
    Q = S + Bt

    col = torch.arange(Q, device=device)
    pad = (S - lens).unsqueeze(1)  # (B, 1) number of pad columns per row
    real = col.unsqueeze(0) >= pad  # (B, Q) key column holds a real token
    # Branch id of each column: -1 for prompt columns, b for label b's branch tokens.
    branch_of = torch.full((Q,), -1, device=device, dtype=torch.long)
    branch_step = torch.zeros(Q, device=device, dtype=torch.long)
    c = S
    for b, branch in enumerate(plan.branches):
        n = len(branch)
        branch_of[c:c + n] = b
        branch_step[c:c + n] = torch.arange(n, device=device)
        c += n
    # Position ids: prompt tokens count on from the prefix; branch token j sits at prompt end + j.
    pos = torch.where(col.unsqueeze(0) < S, P + col.unsqueeze(0) - pad,
                      P + lens.unsqueeze(1) + branch_step.unsqueeze(0)).clamp(min=0)  # (B, Q)

    q_br, k_br = branch_of.view(Q, 1), branch_of.view(1, Q)
    causal = col.view(1, Q) <= col.view(Q, 1)  # (Q, Q) key column <= query column
    # A query sees earlier real prompt columns, plus earlier columns of its own branch.
    visible = causal & ((k_br == -1) | (k_br == q_br))  # (Q, Q)
    mask = visible.unsqueeze(0) & real.unsqueeze(1)  # (B, Q, Q)
    mask = mask | torch.eye(Q, dtype=torch.bool, device=device).unsqueeze(0)  # pad rows see themselves: no NaN
    if P:
        mask = torch.cat([torch.ones(B, Q, P, dtype=torch.bool, device=device), mask], dim=2)  # (B, Q, P+Q)
    mask = mask.unsqueeze(1)  # (B, 1, Q, P+Q)

    with torch.inference_mode():
        if weights is not None or lean_forward_ok(decoder):  # a plain Llama on the CPU (or a LoRA one with
            # its adapter merged into `weights`): the same arithmetic in fewer, larger kernels
            start = frozen.stream(decoder, ids, pos, mask, prefix_kv, weights) if frozen is not None else None
            hidden = lean_forward(decoder, ids, pos, mask, prefix_kv, weights, start=start)  # (B, Q, H)
        else:
            kwargs = {cache_kwarg(decoder): expanded_cache(prefix_kv, B)}
            hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=P > 0,
                             **kwargs).last_hidden_state  # (B, Q, H)
        # (B, 1 + Bt, H): last prompt token, then the branch tokens. Contiguous: a strided 3-D input sends
        # the LM head through a batched matmul that copies its (V, H) weight once per row (~0.8 s a batch
        # of 16 on SmolLM2, 2 CPU cores, against 0.03 s).
        needed = hidden[:, S - 1:].contiguous()
        logp = torch.log_softmax(head(needed).float(), dim=-1)  # (B, 1 + Bt, V)
        terms = logp[:, torch.tensor(plan.term_pos, device=device),
                     torch.tensor(plan.term_tok, device=device)]  # (B, n_terms)
        n_labels = len(codec.label_ids)
        sums = torch.zeros(B, 2 * n_labels if with_eos else n_labels, device=device)
        sums.index_add_(1, torch.tensor(plan.term_label, device=device), terms)  # (B, n_labels[ * 2])
    sums = sums.cpu()
    return (sums[:, :n_labels], sums[:, n_labels:]) if with_eos else sums


def softmax_probs(loglik_row: torch.Tensor, label_names: Sequence[str]) -> dict[str, float]:
    """The label distribution of one row of `score_labels` (normalised over the labels only)."""
    p = torch.softmax(loglik_row, dim=-1)
    return {name: float(v) for name, v in zip(label_names, p)}


@dataclass
class ResponseScores:
    """Label scoring of labelled examples: each one's predicted label, and the loss of its gold response."""

    predicted: list[int]  # per example, in the order given: the label index scoring highest
    n_correct: int  # examples whose predicted label is their gold label
    nll: float  # - sum of log p over the gold responses' tokens (label + EOS)
    n_tokens: int  # those tokens

    @property
    def loss(self) -> float:
        """Mean loss per response token: a training loss over the response (label + EOS)."""
        return self.nll / max(1, self.n_tokens)

    @property
    def accuracy(self) -> float:
        return self.n_correct / max(1, len(self.predicted))


def score_responses(model: Any, codec: PromptCodec, examples: Sequence[Any], prefix_kv: tuple | None, *,
                    weights: Any = None, pad_id: int | None = None, batch_size: int = 16,
                    frozen: FrozenStreams | None = None) -> ResponseScores:
    """Predictions and gold-response loss of examples (`codec.Example`s: `.body`, `.label_index`) from one
    scoring forward each: the loss reads the gold label's tokens and its EOS where score mode reads every
    label's, so validation needs no second pass. Batches run shortest first (less padding)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].body))
    predicted = [0] * len(examples)
    n_correct, nll, n_tokens = 0, 0.0, 0
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        loglik, eos = score_labels(model, codec, [examples[i].body for i in idx], prefix_kv, pad_id=pad_id,
                                   weights=weights, with_eos=True, frozen=frozen)
        for row, i in enumerate(idx):
            gold = examples[i].label_index
            predicted[i] = int(loglik[row].argmax())
            n_correct += predicted[i] == gold
            nll -= float(loglik[row, gold] + eos[row, gold])
            n_tokens += len(codec.label_ids[gold]) + 1
    return ResponseScores(predicted=predicted, n_correct=n_correct, nll=nll, n_tokens=n_tokens)
