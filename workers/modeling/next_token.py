"""Next-token distributions after prompts and a few fixed continuations of them, in one forward pass.

The probability-weighted judge reads a score from the judge model's next-token distribution instead of
from generated text: after the prompt and a fixed answer prefix (`{"coherence": `), the probabilities
of the digit tokens say which scores the model would write and how sure it is. A score of 0-100 takes up
to three digits, so the judge also needs the distribution after "answer prefix + 1", "+ 2", ... and
"+ 1 0". All those continuations share their first tokens, so they are laid out as a token tree after
each prompt: every distinct continuation prefix is one extra column, attending to the prompt and to its
own ancestors only (the same custom-mask idea as `workers.modeling.scoring.score_labels`). One pass over
(batch, prompt + tree) columns gives every distribution, and the LM head runs only at the columns read.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from workers.modeling.forward import cache_kwarg, decoder_of, expanded_cache, left_padded, lm_head_of


def _token_tree(continuations: Sequence[Sequence[int]]) -> tuple[list[int], list[int], list[int], list[int]]:
    """Lay the continuations out as a trie.

    Returns:
        (token of each node, parent node of each node (-1: the prompt), depth of each node (1-based),
        the node each continuation ends on (-1: the empty continuation, read at the prompt's last token)).
    """
    tokens: list[int] = []
    parent: list[int] = []
    depth: list[int] = []
    index: dict[tuple[int, ...], int] = {}
    ends = []
    for cont in continuations:
        node = -1
        for j in range(len(cont)):
            key = tuple(cont[:j + 1])
            if key not in index:
                index[key] = len(tokens)
                tokens.append(int(cont[j]))
                parent.append(node)
                depth.append(j + 1)
            node = index[key]
        ends.append(node)
    return tokens, parent, depth, ends


def next_token_probs(model: Any, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                     candidate_ids: Sequence[int], *, pad_id: int, prefix_kv: tuple | None = None,
                     prefix_len: int = 0) -> torch.Tensor:
    """The probability of each candidate token next, after each prompt followed by each continuation.

    Args:
        model: the causal LM (plain or PEFT-wrapped).
        prompts: per-item token ids (after the shared prefix when `prefix_kv` is given), each non-empty.
        continuations: token sequences appended to every prompt (may be empty: right after the prompt).
            Shared leading tokens are run once per item.
        candidate_ids: the token ids whose probabilities are returned.
        pad_id: the id put in pad columns (never attended to).
        prefix_kv: a shared prefix's per-layer KV (`workers.modeling.forward.prefix_kv`), or None.
        prefix_len: that prefix's length in tokens (0 without one).

    Returns:
        float32 tensor (batch, n_continuations, n_candidates) on the CPU: probabilities under the full
        softmax over the vocabulary (so each row's candidates sum to at most 1; the rest is the mass the
        model put on other tokens).

    Raises:
        ValueError: an empty prompt, or no continuations.
    """
    if not continuations:
        raise ValueError("next_token_probs needs at least one continuation (an empty one reads right after the prompt)")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("next_token_probs: every prompt needs at least one token after the shared prefix")
    decoder, head = decoder_of(model), lm_head_of(model)
    device = head.weight.device
    B, P = len(prompts), (prefix_len if prefix_kv is not None else 0)
    tree_tok, tree_parent, tree_depth, ends = _token_tree(continuations)
    T = len(tree_tok)
    # Left padding puts every prompt's last token in column S-1; the tree's nodes follow in S..Q-1.
    ids, lens, S = left_padded(prompts, list(tree_tok), pad_id, device)
    Q = S + T

    col = torch.arange(Q, device=device)
    pad = (S - lens).unsqueeze(1)  # (B, 1) pad columns per row
    real = col.unsqueeze(0) >= pad  # (B, Q) the column holds a real token
    depth = torch.zeros(Q, dtype=torch.long, device=device)
    if T:
        depth[S:] = torch.tensor(tree_depth, dtype=torch.long, device=device)
    # Prompt tokens count on from the shared prefix; a tree node at depth k sits k places after the prompt.
    pos = torch.where(col.unsqueeze(0) < S, P + col.unsqueeze(0) - pad,
                      P + lens.unsqueeze(1) - 1 + depth.unsqueeze(0)).clamp(min=0)  # (B, Q)

    # Tree visibility: prompt columns see earlier prompt columns (causal); a node sees every prompt column,
    # its ancestors and itself.
    visible = col.view(1, Q) <= col.view(Q, 1)  # (Q, Q): key column <= query column
    visible[S:, S:] = False
    for n in range(T):
        a = n
        while a != -1:
            visible[S + n, S + a] = True
            a = tree_parent[a]
    mask = visible.unsqueeze(0) & real.unsqueeze(1)  # (B, Q, Q)
    mask = mask | torch.eye(Q, dtype=torch.bool, device=device).unsqueeze(0)  # pad rows see themselves: no NaN
    if P:
        mask = torch.cat([torch.ones(B, Q, P, dtype=torch.bool, device=device), mask], dim=2)  # (B, Q, P+Q)
    mask = mask.unsqueeze(1)  # (B, 1, Q, P+Q)

    read_cols = torch.tensor([S - 1 if e == -1 else S + e for e in ends], device=device)  # (n_cont,)
    cand = torch.tensor(list(candidate_ids), dtype=torch.long, device=device)
    kwargs = {cache_kwarg(decoder): expanded_cache(prefix_kv, B)}
    with torch.inference_mode():
        hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=P > 0,
                         **kwargs).last_hidden_state  # (B, Q, H)
        probs = torch.softmax(head(hidden[:, read_cols]).float(), dim=-1)  # (B, n_cont, V)
        out = probs[:, :, cand]  # (B, n_cont, n_candidates)
    return out.cpu()


def common_prefix(seqs: Sequence[Sequence[int]], *, keep: int = 1) -> int:
    """Length of the token prefix every sequence shares, leaving at least `keep` tokens in each.

    The judge's prompts share the rubric (the system message); running it once per job as a key/value
    cache (`workers.modeling.forward.prefix_kv`) saves most of each item's forward pass.
    """
    if not seqs:
        return 0
    n = min(len(s) for s in seqs) - keep
    first = seqs[0]
    for i in range(max(n, 0)):
        t = first[i]
        if any(s[i] != t for s in seqs):
            return i
    return max(n, 0)
