"""`POST /v1/chat/completions` and `POST /v1/completions`: a few texts classified at once by a worker.

Each request becomes a small classify job (core/openai_shapes.py reads the request and writes the answer, the
same functions a batch's lines go through); the route waits for it up to NEWSLORA_OPENAI_SYNC_TIMEOUT_S and
answers 429 (`x-should-retry: false`) past that, saying to send the texts as a batch. A request restricted
to a single choice needs no model: that choice has probability 1, answered at once.
"""
from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from api.deps import CallerDep, SessionDep
from api.routers.openai.errors import OpenAIError, openai_errors
from api.routers.openai.serving import (cancel_job, classify_spec, generation_options, resolve_model,
                                        submit_classify, wait_job)
from core.contracts.prediction import PredictionRow
from core.ids import new_id
from core.openai_shapes import CHAT, COMPLETIONS, RequestError, parse_request, response_body, row_status
from core.settings import get_settings
from db import results as resq

router = APIRouter(prefix="/v1", tags=["openai"])
MAX_PROMPTS = 16  # texts one /v1/completions request may carry; more go in a batch

ChoiceText = Annotated[str, Field(min_length=1, pattern=r"\S")]
Choice = Field(default=None, min_length=1, max_length=64, json_schema_extra={"uniqueItems": True},
               description="vLLM's convention: the answer is one of these (score mode)")
# Strict: the schema's types are what is accepted (no "5" for 5, no 0 for false); 4.0 is JSON's integer 4.
REQUEST = ConfigDict(extra="allow", strict=True)


def _whole(v: Any) -> Any:
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _false(v: bool) -> bool:
    if v:
        raise ValueError("only false is served")
    return v


def Int(**bounds: int) -> Any:  # noqa: N802 - a type
    return Annotated[int, Field(strict=True, **bounds), BeforeValidator(_whole)]


OnlyFalse = Annotated[bool, AfterValidator(_false), Field(json_schema_extra={"enum": [False]})]


class TextPart(BaseModel):
    model_config = REQUEST
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = REQUEST
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] = ""


class StructuredOutputs(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    choice: list[ChoiceText] = Field(min_length=1, max_length=64, json_schema_extra={"uniqueItems": True})


class _Common(BaseModel):
    model_config = REQUEST
    model: str = Field(min_length=1, description="a base model or a fine-tune (GET /v1/models)")
    n: Int(ge=1, le=1) | None = None  # type: ignore[valid-type]
    stream: OnlyFalse | None = None
    guided_choice: list[ChoiceText] | None = Choice
    structured_outputs: StructuredOutputs | None = None
    max_tokens: Int(ge=1, le=1024) | None = None  # type: ignore[valid-type]
    max_completion_tokens: Int(ge=1, le=1024) | None = None  # type: ignore[valid-type]
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: Int(ge=-2**53, le=2**53) | None = None  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _choices(self):
        for choices in (self.guided_choice, self.structured_outputs.choice if self.structured_outputs else None):
            if choices is not None and len(set(choices)) != len(choices):
                raise ValueError("choices must be distinct")
        return self


class ChatCompletionRequest(_Common):
    model_config = ConfigDict(extra="allow", strict=True, json_schema_extra={"examples": [
        {"model": "smollm2-135m", "messages": [{"role": "user", "content": "Stocks rallied as oil fell."}],
         "guided_choice": ["Business"], "logprobs": True, "top_logprobs": 1}]})
    messages: list[ChatMessage] = Field(min_length=1, json_schema_extra={
        "contains": {"type": "object", "properties": {"role": {"const": "user"}}, "required": ["role"]}})
    logprobs: bool | None = None
    top_logprobs: Int(ge=0, le=20) | None = None  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _a_user_message(self):
        if not any(m.role == "user" for m in self.messages):
            raise ValueError("messages holds no user message: the text to classify is the last user message")
        return self


class CompletionRequest(_Common):
    model_config = ConfigDict(extra="allow", strict=True, json_schema_extra={"examples": [
        {"model": "smollm2-135m", "prompt": "Stocks rallied as oil fell.", "guided_choice": ["Business"],
         "logprobs": 1}]})
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)] = Field(
        description=f"one text, or a list of at most {MAX_PROMPTS} (send more as a batch)")
    logprobs: Int(ge=0, le=5) | None = None  # type: ignore[valid-type]
    echo: OnlyFalse | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None = None
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]


SYNC_ERRORS = openai_errors(400, 401, 404, 422, 429, 503)


def _answer(endpoint: str, body: dict[str, Any], session, caller) -> dict[str, Any]:
    s = get_settings()
    model = resolve_model(str(body.get("model")), session, caller)  # first: an unknown model is a 404
    try:
        req = parse_request(endpoint, body, max_prompts=MAX_PROMPTS)
    except RequestError as e:
        raise OpenAIError(400, str(e), param=e.param) from None
    items = [{"id": str(i), "text": t} for i, t in enumerate(req.texts)]
    spec = classify_spec(req, model, items=items, extra=generation_options(body))
    if spec["mode"] == "score" and spec["label_names"] is not None and len(spec["label_names"]) == 1:
        label = spec["label_names"][0]  # one choice: probability 1, no model needed
        rows = [PredictionRow(item_id=it["id"], label=label, probs={label: 1.0}) for it in items]
        return response_body(endpoint, rows, req.answer)
    job = submit_classify(spec, session, caller)
    done = wait_job(job.id, session, timeout_s=s.openai_sync_timeout_s)
    if done is None:
        cancel_job(job.id, session)
        raise OpenAIError(429, f"the request did not finish within {s.openai_sync_timeout_s:g} s (the workers are "
                               f"busy or the texts many): send it as a batch (POST /v1/files, then POST "
                               f"/v1/batches)", code="timeout", headers={"x-should-retry": "false"})
    if done.status != "succeeded":
        raise OpenAIError(500, f"the classification failed: {done.error or done.status}", code="job_failed")
    rows = {r.item_id: r for r in resq.prediction_rows(job.id, session=session)}
    answered = [rows.get(it["id"]) for it in items]
    failed = next((r for r in answered if r is None or r.error is not None), None)
    if failed is not None:
        status = 500 if failed is None else row_status(failed)
        raise OpenAIError(status, f"the text could not be classified: {failed.error if failed else 'no answer'}")
    return response_body(endpoint, answered, req.answer, completion_id=new_id("chatcmpl-" if endpoint == CHAT
                                                                                 else "cmpl-"),
                         created=int(time.time()))


@router.post("/chat/completions", response_model=ChatCompletion, responses=SYNC_ERRORS)
def chat_completions(body: ChatCompletionRequest, session: SessionDep, caller: CallerDep) -> JSONResponse:
    """Classify one text (the last user message) and answer as a chat completion."""
    return JSONResponse(_answer(CHAT, body.model_dump(mode="json", exclude_none=True), session, caller))


@router.post("/completions", response_model=Completion, responses=SYNC_ERRORS)
def completions(body: CompletionRequest, session: SessionDep, caller: CallerDep) -> JSONResponse:
    """Classify each prompt (a few) and answer as a text completion, one choice per prompt."""
    return JSONResponse(_answer(COMPLETIONS, body.model_dump(mode="json", exclude_none=True), session, caller))
