"""Prompt templates: the one text layout that training and inference share.

The template's name is stored with every prepared dataset and every adapter, and inference reads it
from there, so a prompt is never re-typed at serving time.
"""
from __future__ import annotations

from typing import Literal

TemplateName = Literal["alpaca", "chat"]

ALPACA_HEADER = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)
ALPACA_NO_INPUT_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)


def default_instruction(label_names: list[str]) -> str:
    """'Classify this news article as World, Sports, Business or Sci/Tech.'"""
    if not label_names:
        raise ValueError("label_names is empty: a classification instruction needs at least one label")
    names = label_names[0] if len(label_names) == 1 else ", ".join(label_names[:-1]) + " or " + label_names[-1]
    return f"Classify this news article as {names}. Answer with the category name only."


def render_prompt(instruction: str, input_text: str, *, template: TemplateName = "alpaca",
                  tokenizer=None) -> str:
    """The prompt text up to where the response starts (the response is appended verbatim).

    Args:
        template: "alpaca" (the reference project's layout) or "chat" (the tokenizer's chat template).
        tokenizer: needed for "chat".
    """
    if template == "alpaca":
        if input_text:
            return f"{ALPACA_HEADER}### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n### Response:\n"
        return f"{ALPACA_NO_INPUT_HEADER}### Instruction:\n{instruction}\n\n### Response:\n"
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat' needs a tokenizer with a chat template; use template 'alpaca'")
        content = f"{instruction}\n\n{input_text}" if input_text else instruction
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    raise ValueError(f"unknown prompt template {template!r}: use 'alpaca' or 'chat'")


def split_prompt(instruction: str, input_text: str, *, template: TemplateName = "alpaca",
                 tokenizer=None) -> tuple[str, str]:
    """(shared prefix, per-item suffix): the prefix is the same for every item of a dataset, so its
    key/value cache can be computed once. prefix + suffix == render_prompt(...)."""
    marker = "\x00NEWSLORA_INPUT\x00"
    full = render_prompt(instruction, marker, template=template, tokenizer=tokenizer)
    prefix, rest = full.split(marker, 1)
    return prefix, input_text + rest
