"""Free generation with one set of stop rules, and reading a label out of a response.

Classification in generate mode, dialogue answers and text-mode judges all generate here, so a
response ends at the same markers everywhere: EOS, or the start of the template's next section.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import torch

# Where a response ends when the model runs on past it: the alpaca template's next section, a bare
# "Instruction:" line (small models' variant of it), and the chat template's end-of-turn marker.
STOP_MARKERS = ("###", "\nInstruction:", "<|im_end|>")


def end_of_response(text: str) -> str:
    """The response up to the earliest stop marker, stripped."""
    cut = min((i for i in (text.find(m) for m in STOP_MARKERS) if i >= 0), default=len(text))
    return text[:cut].strip()


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of whole prompts, special tokens added as in training (`PromptCodec`)."""
    return tokenizer(list(prompts), add_special_tokens=True)["input_ids"]


def generate(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, repetition_penalty: float = 1.0,
             seed: int = 0) -> list[str]:
    """Generate after each prompt (token ids, left-padded into one batch) and cut at the stop rules.

    Args:
        prompts: whole prompts as token ids (`encode_prompts`, or codec prefix + body).
        temperature: 0 for greedy decoding; above 0 samples with `top_p`, seeded by `seed`.

    Returns:
        the decoded responses, each cut by `end_of_response`.
    """
    from transformers import GenerationConfig
    device = model.device if hasattr(model, "device") else next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    att = torch.zeros((len(prompts), L), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(list(p))
        att[i, L - len(p):] = 1
    gen_cfg = getattr(model, "generation_config", None)
    eos = [t for t in {tokenizer.eos_token_id, getattr(gen_cfg, "eos_token_id", None)} if isinstance(t, int)]
    sample = temperature > 0
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample,
                           temperature=temperature if sample else None, top_p=top_p if sample else None,
                           top_k=None, repetition_penalty=repetition_penalty, eos_token_id=eos,
                           pad_token_id=pad_id, stop_strings=list(STOP_MARKERS))
    if sample:
        torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), generation_config=cfg,
                             tokenizer=tokenizer)  # (B, L + new)
    return [end_of_response(t) for t in tokenizer.batch_decode(out[:, L:], skip_special_tokens=True)]


def parse_label(response: str, label_names: Sequence[str]) -> str | None:
    """The label a response names, under the exact-one-label rule (case-insensitive, whole words).

    Strict on purpose: a label counts only when its exact name appears (any case) with no letter or digit
    touching it, so "Sci/Tech" matches "sci/tech" but not "Sci-Tech" or "Science". A response naming no
    label, or several different ones, does not follow the instruction and gets None.
    """
    found = {name for name in label_names
             if re.search(rf"(?<![0-9A-Za-z]){re.escape(name)}(?![0-9A-Za-z])", response, flags=re.IGNORECASE)}
    return found.pop() if len(found) == 1 else None
