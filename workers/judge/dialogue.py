"""The general-instruction set (`workers/data/dialogue.jsonl`): instructions that are not classification,
answered by a model, to see whether fine-tuning leaves it able to follow other instructions."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from workers.modeling.prompts import render_prompt

DIALOGUE_FILE = Path(__file__).resolve().parents[1] / "data" / "dialogue.jsonl"
ANSWER_BATCH_SIZE = 16


def dialogue_items(path: Path | None = None) -> list[dict[str, Any]]:
    """The shipped general instructions (not classification): item_id, instruction, input, reference.

    Raises:
        ValueError: a line is not a JSON object with id and instruction.
    """
    path = Path(path) if path else DIALOGUE_FILE
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e})") from e
        if not isinstance(raw, dict) or not raw.get("id") or not raw.get("instruction"):
            raise ValueError(f"{path}:{n}: each line needs an id and an instruction")
        items.append({"item_id": str(raw["id"]), "instruction": raw["instruction"], "input": raw.get("input", ""),
                      "reference": raw.get("reference", "")})
    if not items:
        raise ValueError(f"{path} holds no items")
    return items


def answer_dialogue(items: Sequence[Mapping[str, Any]], model: Any, tokenizer: Any, template: str = "alpaca",
                    max_new_tokens: int = 128, *, batch_size: int = ANSWER_BATCH_SIZE) -> list[dict[str, Any]]:
    """Have a model answer the items greedily, in the prompt layout it was trained with.

    Args:
        items: from dialogue_items().
        model, tokenizer: a loaded causal LM and its tokenizer (an `InferenceEngine`'s, inside `use(adapter)`
            to answer with an adapter).
        template: the prompt template ("alpaca" or "chat") from workers.modeling.prompts.
        batch_size: answers generated together (the shipped set fits one batch: on a CPU one batch of 12 takes
            about 60% of the time of three batches of 4).

    Returns:
        The items, each with its "response" added (cut by `workers.modeling.generation`'s stop rules).
    """
    from workers.modeling.generation import encode_prompts, generate  # lazy: torch (the API/CLI import the judge)

    out = []
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        prompts = [render_prompt(it["instruction"], it.get("input") or "", template=template, tokenizer=tokenizer)
                   for it in batch]
        texts = generate(model, tokenizer, encode_prompts(tokenizer, prompts), max_new_tokens=max_new_tokens)
        out += [{**it, "response": text} for it, text in zip(batch, texts)]
    return out
