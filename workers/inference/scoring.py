"""Prompt encoding, label scoring and free generation: the tensor work of classification.

Score mode runs one forward pass per batch over the per-item part of the prompt, on top of the shared
instruction prefix's key/value cache (computed once per engine, adapter and prefix), with every
multi-token label's continuation appended to the same pass under a custom attention mask, and applies
the LM head only at the few positions whose next token is a label token.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from workers.prompts import split_prompt


class LabelTokensError(ValueError):
    """The label names cannot be scored apart (empty, repeated, or one's tokens a prefix of another's)."""


@dataclass
class PromptPlan:
    """Token ids shared by every item of a job: the prompt prefix, the template's tail, the labels.

    Attributes:
        prefix_ids: the shared prompt prefix (template header + instruction), with any BOS.
        prefix_text: the prefix as text (item token boundaries are located by character offsets).
        tail_text: the template's text after the article (up to where the response starts).
        label_ids: each label's tokens as they follow the prompt (tokenized jointly with it).
    """

    prefix_ids: list[int]
    prefix_text: str
    tail_text: str
    tail_len: int
    label_names: list[str]
    label_ids: list[list[int]]
    # Scoring gather plan (see `_label_terms`): one entry per (label, token) term.
    branch_len: int = 0
    term_pos: list[int] = field(default_factory=list)
    term_tok: list[int] = field(default_factory=list)
    term_label: list[int] = field(default_factory=list)


@dataclass
class EncodedItem:
    ids: list[int]  # per-item prompt tokens after the shared prefix (article, cut if needed, + tail)
    truncated: bool


def make_plan(tokenizer, *, instruction: str, template: str, label_names: list[str]) -> PromptPlan:
    """Tokenize the parts of the prompt every item shares and check the labels can be scored apart.

    Raises:
        LabelTokensError: labels empty, repeated, tokenizing to nothing, or one's tokens a prefix of another's.
    """
    if not label_names:
        raise LabelTokensError("label_names is empty: give the label names to classify into")
    if len(set(label_names)) != len(label_names):
        raise LabelTokensError(f"label_names repeats a name: {label_names}")
    prefix, tail = split_prompt(instruction, "", template=template, tokenizer=tokenizer)
    prefix_ids = tokenizer(prefix, add_special_tokens=True)["input_ids"]
    # Labels are tokenized as they follow the prompt (as in training), not on their own: SentencePiece
    # tokenizers would otherwise add a word-start marker that the prompt's newline does not produce.
    # A stand-in article keeps the prefix's last newline from merging with the tail's first ones.
    head = tokenizer(prefix + "x" + tail, add_special_tokens=True)["input_ids"]
    tail_len = len(head) - len(tokenizer(prefix + "x", add_special_tokens=True)["input_ids"])
    label_ids = []
    for name in label_names:
        full = tokenizer(prefix + "x" + tail + name, add_special_tokens=True)["input_ids"]
        if full[:len(head)] != head or len(full) == len(head):
            full_alone = tokenizer(name, add_special_tokens=False)["input_ids"]
            if not full_alone:
                raise LabelTokensError(f"label {name!r} tokenizes to nothing")
            label_ids.append(full_alone)
        else:
            label_ids.append(full[len(head):])
    for i, a in enumerate(label_ids):
        for j, b in enumerate(label_ids):
            if i != j and len(a) <= len(b) and b[:len(a)] == a:
                raise LabelTokensError(
                    f"label {label_names[i]!r}'s tokens are a prefix of {label_names[j]!r}'s, so score mode "
                    f"would never prefer the longer one; rename a label or use mode='generate'")
    plan = PromptPlan(prefix_ids=prefix_ids, prefix_text=prefix, tail_text=tail, tail_len=tail_len,
                      label_names=list(label_names), label_ids=label_ids)
    _label_terms(plan)
    return plan


def _label_terms(plan: PromptPlan) -> None:
    """Where each label token's log-probability is read in the gathered logits.

    The scored positions are [last prompt token] + the branch tokens. A label of k tokens t0..t(k-1)
    contributes a branch of t0..t(k-2) (appended after the prompt, seeing only the prompt and itself):
    t0 is predicted at the last prompt token, t(j) at its branch's token j-1.
    """
    pos, tok, lab = [], [], []
    offset = 1  # gathered position 0 is the last prompt token
    for li, ids in enumerate(plan.label_ids):
        pos.append(0)
        tok.append(ids[0])
        lab.append(li)
        for j in range(1, len(ids)):
            pos.append(offset + j - 1)
            tok.append(ids[j])
            lab.append(li)
        offset += len(ids) - 1
    plan.branch_len = offset - 1
    plan.term_pos, plan.term_tok, plan.term_label = pos, tok, lab


def encode_items(tokenizer, plan: PromptPlan, texts: list[str], *, max_article_tokens: int) -> list[EncodedItem]:
    """Per-item prompt tokens after the shared prefix, the article cut to `max_article_tokens`.

    Each prompt is tokenized whole (prefix + article + tail, as training does), then split by character
    offsets; only the article is ever cut, never the template.
    """
    if max_article_tokens < 1:
        raise ValueError(f"no room for the article: the prompt template alone fills the model's context "
                         f"(max article tokens {max_article_tokens}); use a model with a longer context")
    plen = len(plan.prefix_text)
    prompts = [plan.prefix_text + t + plan.tail_text for t in texts]
    enc = tokenizer(prompts, add_special_tokens=True, return_offsets_mapping=True)
    P = len(plan.prefix_ids)
    out = []
    for text, ids, offs in zip(texts, enc["input_ids"], enc["offset_mapping"]):
        art_end = plen + len(text)
        # First token starting at or after the prefix's end: normally index P. If the article's first
        # characters merged with the prefix's last token, re-start at the next token boundary.
        start = P if ids[:P] == plan.prefix_ids else next(
            (i for i, (s, _) in enumerate(offs) if s >= plen), len(ids))
        tail_start = next((i for i in range(start, len(ids)) if offs[i][0] >= art_end and offs[i][1] > offs[i][0]),
                          len(ids))
        article, tail = ids[start:tail_start], ids[tail_start:]
        truncated = len(article) > max_article_tokens
        out.append(EncodedItem(ids=article[:max_article_tokens] + tail, truncated=truncated))
    return out


def new_cache(engine, kv: tuple | None, batch: int):
    """A DynamicCache holding the shared prefix's KV expanded to `batch` rows (None without a prefix)."""
    from transformers import DynamicCache
    if kv is None:
        return None
    # (1, kv_heads, P, head_dim) -> (batch, kv_heads, P, head_dim); the cache's first update copies.
    return DynamicCache([(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in kv])


def score_batch(engine, plan: PromptPlan, seqs: list[list[int]], prefix_kv: tuple | None):
    """Log-likelihood of every label's token sequence after each item's prompt, one forward pass.

    Args:
        seqs: per-item prompt tokens after the shared prefix (the whole prompt when `prefix_kv` is None).
        prefix_kv: the shared prefix's per-layer KV (`InferenceEngine.prefix_kv`), or None.

    Returns:
        float32 tensor (batch, n_labels): sum over each label's tokens of log p(token | prompt, earlier tokens).
    """
    import torch
    device = engine.device
    B = len(seqs)
    P = len(plan.prefix_ids) if prefix_kv is not None else 0
    Bt = plan.branch_len
    lens = torch.tensor([len(s) for s in seqs], device=device)  # (B,)
    S = int(lens.max())
    Q = S + Bt
    # Rows are left-padded so that every item's last prompt token sits in column S-1 and the
    # label branches (identical for all items) in columns S..Q-1.
    ids = torch.full((B, Q), engine.tokenizer.pad_token_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, S - len(s):S] = torch.tensor(s, dtype=torch.long)
    branch = [t for lab in plan.label_ids for t in lab[:-1]]
    if Bt:
        ids[:, S:] = torch.tensor(branch, dtype=torch.long)
    ids = ids.to(device)

    col = torch.arange(Q, device=device)
    pad = (S - lens).unsqueeze(1)  # (B, 1) number of pad columns per row
    real = col.unsqueeze(0) >= pad  # (B, Q) key column holds a real token
    # Branch id of each column: -1 for prompt columns, b for label b's branch tokens.
    branch_of = torch.full((Q,), -1, device=device, dtype=torch.long)
    branch_step = torch.zeros(Q, device=device, dtype=torch.long)
    c = S
    for b, lab in enumerate(plan.label_ids):
        n = len(lab) - 1
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

    kwargs = {engine.cache_kwarg: new_cache(engine, prefix_kv, B)}
    with torch.inference_mode():
        hidden = engine.backbone(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=P > 0,
                                 **kwargs).last_hidden_state  # (B, Q, H)
        needed = hidden[:, S - 1:]  # (B, 1 + Bt, H): last prompt token, then the branch tokens
        logp = torch.log_softmax(engine.lm_head(needed).float(), dim=-1)  # (B, 1 + Bt, V)
        terms = logp[:, torch.tensor(plan.term_pos, device=device),
                     torch.tensor(plan.term_tok, device=device)]  # (B, n_terms)
        loglik = torch.zeros(B, len(plan.label_ids), device=device)
        loglik.index_add_(1, torch.tensor(plan.term_label, device=device), terms)  # (B, n_labels)
    return loglik.cpu()


def generate_batch(engine, plan: PromptPlan, seqs: list[list[int]], *, max_new_tokens: int,
                   temperature: float, top_p: float, repetition_penalty: float, seed: int) -> list[str]:
    """Free generation after each full prompt (left-padded), stopping at EOS or the template's next section.

    Returns:
        the decoded responses, cut at the end of the response.
    """
    import torch
    from transformers import GenerationConfig
    tok = engine.tokenizer
    full = [plan.prefix_ids + s for s in seqs]
    L = max(len(s) for s in full)
    ids = torch.full((len(full), L), tok.pad_token_id, dtype=torch.long)
    att = torch.zeros((len(full), L), dtype=torch.long)
    for i, s in enumerate(full):
        ids[i, L - len(s):] = torch.tensor(s)
        att[i, L - len(s):] = 1
    eos = [t for t in {tok.eos_token_id, getattr(engine.model.generation_config, "eos_token_id", None)}
           if isinstance(t, int)]
    sample = temperature > 0
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample,
                           temperature=temperature if sample else None, top_p=top_p if sample else None,
                           top_k=None, repetition_penalty=repetition_penalty, eos_token_id=eos,
                           pad_token_id=tok.pad_token_id, stop_strings=["###"])
    if sample:
        torch.manual_seed(seed)
    with torch.inference_mode():
        out = engine.model.generate(input_ids=ids.to(engine.device), attention_mask=att.to(engine.device),
                                    generation_config=cfg, tokenizer=tok)  # (B, L + new)
    texts = tok.batch_decode(out[:, L:], skip_special_tokens=True)
    return [end_of_response(t) for t in texts]


def end_of_response(text: str) -> str:
    """The response up to the template's next section marker (`###`), stripped."""
    return text.split("###", 1)[0].strip()


def parse_label(response: str, label_names: list[str]) -> str | None:
    """The label a response names, under the exact-one-label rule (case-insensitive, whole words).

    Strict on purpose: a label counts only when its exact name appears (any case) with no letter or digit
    touching it, so "Sci/Tech" matches "sci/tech" but not "Sci-Tech" or "Science". A response naming no
    label, or several different ones, does not follow the instruction and gets None.
    """
    found = {name for name in label_names
             if re.search(rf"(?<![0-9A-Za-z]){re.escape(name)}(?![0-9A-Za-z])", response, flags=re.IGNORECASE)}
    return found.pop() if len(found) == 1 else None


def softmax_probs(loglik_row: Any, label_names: list[str]) -> dict[str, float]:
    import torch
    p = torch.softmax(loglik_row, dim=-1)
    return {name: float(v) for name, v in zip(label_names, p)}
