"""OpenAI fine-tuning files as classification examples: the chat format and the prompt/completion format.

One JSON object a line, as the OpenAI fine-tuning API takes them:

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "<article>"},
                  {"role": "assistant", "content": "Sports"}]}
    {"prompt": "<article>", "completion": "Sports"}

A line is one classification example. Chat format: the label is the last assistant message that is trained
on (an assistant message's `weight` is 0 or 1, default 1: a weight-0 turn is never the label), the text is
the user message just before it, and the system (or developer) message is the instruction. A line whose
every assistant turn has weight 0 is nothing to train on (`NOT_TRAINED`), not a bad line.

These functions know nothing of files or rows: each takes one parsed object and returns a `ChatExample`, or
raises `RecordProblem` with a reason key and what is wrong (`workers/data/loaders.py` turns it into a
row problem with the line number).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

OPENAI_FORMATS = ("openai_chat", "prompt_completion")
NOT_TRAINED = "not_trained"  # the reason key of a line with nothing to train on (every assistant weight 0)
INSTRUCTION_ROLES = ("system", "developer")
ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class RecordProblem(ValueError):
    """One line that cannot be an example: `reason` (a key counted in meta.json) and `detail` (what to fix)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True, slots=True)
class ChatExample:
    text: str
    label: str
    instruction: str | None = None  # the system message, where the line has one


def openai_format_of(obj: Any) -> str | None:
    """`openai_chat` for an object with `messages`, `prompt_completion` for one with `prompt` and `completion`,
    else None."""
    if isinstance(obj, dict) and "messages" in obj:
        return "openai_chat"
    if isinstance(obj, dict) and "prompt" in obj and "completion" in obj:
        return "prompt_completion"
    return None


def example_from(fmt: str, obj: Any) -> ChatExample:
    """The example one line of an `fmt` file holds.

    Raises:
        RecordProblem: the line is not an example of that format (or, NOT_TRAINED, has nothing to train on).
    """
    if not isinstance(obj, dict):
        raise RecordProblem("not_an_object", f"is a JSON {type(obj).__name__}, not an object")
    if fmt == "openai_chat":
        return chat_example(obj)
    if fmt == "prompt_completion":
        return prompt_completion_example(obj)
    raise ValueError(f"not an OpenAI fine-tuning format: {fmt!r}")


def _content(message: dict[str, Any], i: int) -> str:
    """A message's text: a string, or a list of `{"type": "text", "text": ...}` parts joined."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                         isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise RecordProblem("bad_text", f"messages[{i}].content is a {type(content).__name__}, not text (a string, or "
                                    f"a list of {{\"type\": \"text\", \"text\": ...}} parts)")


def _weight(message: dict[str, Any], i: int) -> int:
    weight = message.get("weight", 1)
    if isinstance(weight, bool) or weight not in (0, 1):
        raise RecordProblem("bad_weight", f"messages[{i}].weight is {weight!r}: give 0 (not trained on) or 1")
    return int(weight)


def chat_example(obj: dict[str, Any]) -> ChatExample:
    """`{"messages": [...]}` -> (text: the user message before the last trained assistant turn, label: that turn).

    Raises:
        RecordProblem: no `messages` list, a message without a known role or text content, a weight that is
            not 0 or 1, no assistant message, no user message before it, an empty answer; NOT_TRAINED
            where every assistant message has weight 0.
    """
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RecordProblem("missing_field", "has no \"messages\" list: give {\"messages\": [{\"role\": \"user\", "
                                             "\"content\": ...}, {\"role\": \"assistant\", \"content\": ...}]}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else None
            raise RecordProblem("bad_message", f"messages[{i}] has role {role!r}: each message needs a role among "
                                               f"{', '.join(ROLES)}")
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistants:
        raise RecordProblem("missing_field", "has no assistant message: the last assistant message is the label")
    trained = [i for i in assistants if _weight(messages[i], i) == 1]
    if not trained:
        raise RecordProblem(NOT_TRAINED, "has weight 0 on every assistant message: nothing to train on")
    answer = trained[-1]
    users = [i for i in range(answer) if messages[i]["role"] == "user"]
    if not users:
        raise RecordProblem("missing_field", f"has no user message before messages[{answer}] (the assistant "
                                             f"answer trained on): the user message is the text to classify")
    label = _content(messages[answer], answer).strip()
    if not label:
        raise RecordProblem("empty_label", f"messages[{answer}] (the assistant answer trained on) is empty")
    system = next((i for i, m in enumerate(messages) if m["role"] in INSTRUCTION_ROLES), None)
    instruction = (_content(messages[system], system).strip() or None) if system is not None else None
    return ChatExample(_content(messages[users[-1]], users[-1]), label, instruction)


def prompt_completion_example(obj: dict[str, Any]) -> ChatExample:
    """`{"prompt", "completion"}` -> (text: the prompt, label: the completion, stripped).

    Raises:
        RecordProblem: a field missing or not a string, or an empty completion.
    """
    missing = [k for k in ("prompt", "completion") if k not in obj]
    if missing:
        raise RecordProblem("missing_field", f"has no {' or '.join(map(repr, missing))} field (fields: "
                                             f"{', '.join(map(str, obj))}): give {{\"prompt\", \"completion\"}}")
    for k in ("prompt", "completion"):
        if not isinstance(obj[k], str):
            raise RecordProblem("bad_text", f"field {k!r} is a {type(obj[k]).__name__}, not text")
    label = obj["completion"].strip()
    if not label:
        raise RecordProblem("empty_label", "has an empty completion")
    return ChatExample(obj["prompt"], label)
