"""OpenAI's request and response shapes for classification: a chat or completions request read as a
classify item, a stored prediction answered as the body the endpoint returns, and the batch file lines.

Pure functions, no store and no HTTP: `/v1/chat/completions`, `/v1/completions` and `/v1/batches`
(api/routers/openai/) call them, so a batch line's body is exactly what the synchronous endpoint answers.

A request is answered by score mode over a set of choices: vLLM's `guided_choice: [...]` (or
`structured_outputs: {"choice": [...]}`) in the body, else the labels the named fine-tune was trained for.
`logprobs` / `top_logprobs` return the label probabilities (their natural log), one "token" per label.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from core.contracts.prediction import PredictionRow
from core.ids import new_id

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
ENDPOINTS = (CHAT, COMPLETIONS)
MAX_CHOICES = 64
MAX_TOP_LOGPROBS = {CHAT: 20, COMPLETIONS: 5}
LOG_ZERO = -9999.0  # log(0): JSON has no -inf


class RequestError(ValueError):
    """A request the endpoint refuses (HTTP 400): the message says what to change, `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class AnswerOptions:
    """How one request wants its answer written (not what decides the label)."""

    model: str
    logprobs: bool = False
    top_logprobs: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "logprobs": self.logprobs, "top_logprobs": self.top_logprobs}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "AnswerOptions":
        return cls(model=str(raw["model"]), logprobs=bool(raw.get("logprobs")),
                   top_logprobs=int(raw.get("top_logprobs") or 0))


@dataclass(frozen=True)
class ClassifyRequest:
    """A chat or completions request as classification: the texts, the choices, the system instruction."""

    endpoint: str
    texts: list[str]
    choices: list[str] | None
    instruction: str | None
    answer: AnswerOptions

    @property
    def job_key(self) -> tuple[Any, ...]:
        """What one classify job must share: the model, the choices and the instruction."""
        return (self.answer.model, tuple(self.choices) if self.choices else None, self.instruction)


# ---------------------------------------------------------------- requests

def _content_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"{where}: only text content parts are served ({{type: 'text', text: ...}})",
                                   param="messages")
            parts.append(part["text"])
        return "\n".join(parts)
    raise RequestError(f"{where}: content must be a string or a list of text parts", param="messages")


def _choices(body: dict[str, Any]) -> list[str] | None:
    raw, param = body.get("guided_choice"), "guided_choice"
    so = body.get("structured_outputs")
    if raw is None and so is not None:
        if not isinstance(so, dict) or "choice" not in so:
            raise RequestError("structured_outputs: only {'choice': [...]} is served", param="structured_outputs")
        raw, param = so["choice"], "structured_outputs.choice"
    if raw is None:
        return None
    if (not isinstance(raw, list) or not raw or len(raw) > MAX_CHOICES
            or not all(isinstance(c, str) and c for c in raw)):
        raise RequestError(f"{param} must be a list of 1 to {MAX_CHOICES} non-empty strings", param=param)
    if len(set(raw)) != len(raw):
        raise RequestError(f"{param} names a choice twice", param=param)
    return list(raw)


def _common(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise RequestError("model is required: a base model (GET /v1/models) or a fine-tune's name", param="model")
    if body.get("stream"):
        raise RequestError("stream is not served: send stream=false (the answer is one label)", param="stream")
    n = body.get("n")
    if n is not None and n != 1:
        raise RequestError("n must be 1: a classification has one answer", param="n")
    return model


def _int_param(body: dict[str, Any], name: str, top: int) -> int:
    value = body.get(name)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        raise RequestError(f"{name} must be an integer from 0 to {top}", param=name)
    return value


def parse_chat(body: dict[str, Any]) -> ClassifyRequest:
    """A chat completions request as classification: the last user message is the text; a system message the
    instruction.

    Raises:
        RequestError: what is wrong with the request (HTTP 400).
    """
    model = _common(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", param="messages")
    system, user = [], None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a role", param="messages")
        if m["role"] in ("system", "developer"):
            system.append(_content_text(m.get("content"), f"messages[{i}]"))
        elif m["role"] == "user":
            user = _content_text(m.get("content"), f"messages[{i}]")
    if user is None:
        raise RequestError("messages holds no user message: the text to classify is the last user message",
                           param="messages")
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise RequestError("logprobs must be true or false", param="logprobs")
    top = _int_param(body, "top_logprobs", MAX_TOP_LOGPROBS[CHAT])
    return ClassifyRequest(CHAT, [user], _choices(body), "\n\n".join(system) or None,
                           AnswerOptions(model, bool(logprobs), top))


def parse_completion(body: dict[str, Any], *, max_prompts: int = 1) -> ClassifyRequest:
    """A completions request as classification: each prompt is a text (at most `max_prompts`).

    Raises:
        RequestError: what is wrong with the request (HTTP 400).
    """
    model = _common(body)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise RequestError("prompt must be a string or a list of strings", param="prompt")
    if len(prompts) > max_prompts:
        raise RequestError(f"at most {max_prompts} prompt(s) per request here: send more as a batch "
                           f"(POST /v1/batches)", param="prompt")
    if body.get("echo"):
        raise RequestError("echo is not served", param="echo")
    logprobs = body.get("logprobs")
    top = _int_param(body, "logprobs", MAX_TOP_LOGPROBS[COMPLETIONS])
    return ClassifyRequest(COMPLETIONS, list(prompts), _choices(body), None,
                           AnswerOptions(model, logprobs is not None, top))


def parse_request(endpoint: str, body: Any, *, max_prompts: int = 1) -> ClassifyRequest:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return parse_chat(body) if endpoint == CHAT else parse_completion(body, max_prompts=max_prompts)


# ---------------------------------------------------------------- batch input lines

@dataclass
class BatchLine:
    """A valid batch input line: its number (1-based), custom_id and request."""

    line: int
    custom_id: str
    request: ClassifyRequest


@dataclass
class LineError:
    """An input line refused: its number, custom_id (when it had one), and why."""

    line: int
    custom_id: str | None
    code: str
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"line": self.line, "custom_id": self.custom_id, "code": self.code, "message": self.message}


@dataclass
class ParsedBatch:
    lines: list[BatchLine] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.lines) + len(self.errors)


def parse_batch_line(n: int, raw: str, endpoint: str) -> BatchLine | LineError:
    """One input line `{custom_id, method, url, body}` checked against the batch's endpoint."""
    try:
        obj = json.loads(raw)
    except ValueError as e:
        return LineError(n, None, "invalid_json", f"line {n}: not valid JSON ({e})")
    if not isinstance(obj, dict):
        return LineError(n, None, "invalid_request", f"line {n}: not a JSON object")
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid or len(cid) > 512:
        return LineError(n, None, "missing_custom_id", f"line {n}: custom_id must be a string of 1 to 512 characters")
    if obj.get("method", "POST") != "POST":
        return LineError(n, cid, "invalid_method", f"line {n}: method must be POST")
    if obj.get("url") != endpoint:
        return LineError(n, cid, "mismatched_endpoint",
                         f"line {n}: url {obj.get('url')!r} is not the batch's endpoint {endpoint!r}")
    try:
        return BatchLine(n, cid, parse_request(endpoint, obj.get("body")))
    except RequestError as e:
        return LineError(n, cid, "invalid_request", f"line {n}: {e}")


def parse_batch(text: str, endpoint: str) -> ParsedBatch:
    """Every line of a batch input file: valid ones, and each refused one with its number. A custom_id seen
    before, or a request that needs another classify job than the first valid line's (another model, choice
    set or system message), is refused on its line."""
    out, seen = ParsedBatch(), set()
    key = None
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        got = parse_batch_line(n, raw, endpoint)
        if isinstance(got, BatchLine):
            if got.custom_id in seen:
                got = LineError(n, got.custom_id, "duplicate_custom_id",
                                f"line {n}: custom_id {got.custom_id!r} is used by an earlier line")
            elif key is None:
                key = got.request.job_key
            elif got.request.job_key != key:
                got = LineError(n, got.custom_id, "mixed_requests",
                                f"line {n}: every line of a batch must name the same model, choices and system "
                                f"message as the first valid line ({out.lines[0].line}); send another batch")
        if isinstance(got, BatchLine):
            seen.add(got.custom_id)
            out.lines.append(got)
        else:
            out.errors.append(got)
    return out


# ---------------------------------------------------------------- answers

def _log(p: float | None) -> float:
    return math.log(p) if p and p > 0 else LOG_ZERO


def _ranked(row: PredictionRow) -> list[tuple[str, float]]:
    return sorted(((k, _log(v)) for k, v in (row.probs or {}).items()), key=lambda kv: -kv[1])


def _token(label: str, lp: float) -> dict[str, Any]:
    return {"token": label, "logprob": lp, "bytes": list(label.encode("utf-8"))}


def answer_text(row: PredictionRow) -> str:
    return row.label if row.label is not None else (row.response or "")


def chat_body(rows: list[PredictionRow], answer: AnswerOptions, *, created: int | None = None,
              completion_id: str | None = None) -> dict[str, Any]:
    """The `chat.completion` answering a request whose text was classified as `rows[0]`."""
    choices = []
    for i, row in enumerate(rows):
        text = answer_text(row)
        logprobs = None
        if answer.logprobs:
            ranked = _ranked(row)
            lp = dict(ranked).get(text, LOG_ZERO)
            logprobs = {"content": [{**_token(text, lp),
                                     "top_logprobs": [_token(k, v) for k, v in ranked[:answer.top_logprobs]]}],
                        "refusal": None}
        choices.append({"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                        "logprobs": logprobs, "finish_reason": "stop"})
    return {"id": completion_id or new_id("chatcmpl-"), "object": "chat.completion",
            "created": created if created is not None else int(time.time()), "model": answer.model,
            "choices": choices}


def completion_body(rows: list[PredictionRow], answer: AnswerOptions, *, created: int | None = None,
                    completion_id: str | None = None) -> dict[str, Any]:
    """The `text_completion` answering a request whose prompts were classified as `rows` (in order)."""
    choices = []
    for i, row in enumerate(rows):
        text = answer_text(row)
        logprobs = None
        if answer.logprobs:
            ranked = _ranked(row)
            logprobs = {"tokens": [text], "token_logprobs": [dict(ranked).get(text, LOG_ZERO)],
                        "top_logprobs": [dict(ranked[:answer.top_logprobs])], "text_offset": [0]}
        choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": "stop"})
    return {"id": completion_id or new_id("cmpl-"), "object": "text_completion",
            "created": created if created is not None else int(time.time()), "model": answer.model,
            "choices": choices}


def response_body(endpoint: str, rows: list[PredictionRow], answer: AnswerOptions, **kw: Any) -> dict[str, Any]:
    return (chat_body if endpoint == CHAT else completion_body)(rows, answer, **kw)


def error_body(message: str, *, status_code: int, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error" if status_code < 500 else "api_error",
                      "param": None, "code": code}}


def row_status(row: PredictionRow) -> int:
    """The HTTP status a prediction is answered with: 200, 400 for an item refused on input, else 500."""
    if row.error is None:
        return 200
    return 400 if "rejected" in (row.flags or []) else 500


# ---------------------------------------------------------------- batch output lines

def output_line(custom_id: str, status_code: int, body: dict[str, Any]) -> dict[str, Any]:
    """A line of a batch's output (status 200) or error file (a request that ran and failed)."""
    return {"id": new_id("batch_req_"), "custom_id": custom_id,
            "response": {"status_code": status_code, "request_id": new_id(""), "body": body},
            "error": None}


def error_line(custom_id: str | None, code: str, message: str, *, line: int | None = None) -> dict[str, Any]:
    """A line of a batch's error file for a request that never ran (refused on input, or cancelled)."""
    err: dict[str, Any] = {"code": code, "message": message}
    if line is not None:
        err["line"] = line
    return {"id": new_id("batch_req_"), "custom_id": custom_id, "response": None, "error": err}


def prediction_line(endpoint: str, custom_id: str, row: PredictionRow, answer: AnswerOptions,
                    *, created: int) -> dict[str, Any]:
    """The output or error line answering one batch request from its stored prediction."""
    status = row_status(row)
    if status == 200:
        return output_line(custom_id, 200, response_body(endpoint, [row], answer, created=created))
    return output_line(custom_id, status, error_body(row.error or "failed", status_code=status))


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines).encode("utf-8")
