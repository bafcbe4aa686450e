"""A judge model behind any OpenAI-compatible chat server (Ollama's `/v1`, vLLM, llama.cpp,
`transformers serve`, OpenAI), through the official `openai` client; the rubric's schema is sent as
`response_format` where the server takes it."""
from __future__ import annotations

import hashlib
import json
from typing import Any

from core.settings import environment_secret
from workers.judge.backends.base import JudgeAnswer
from workers.judge.errors import JudgeError, JudgeFatal, JudgeModelMissing, JudgeUnavailable, is_transient_status
from workers.judge.rubrics import TWO_SCORE, Rubric


class OpenAIJudge:
    """A judge model behind any OpenAI-compatible chat server, through the official `openai` client.

    Args:
        model: the model name the server knows (`GET /v1/models`).
        base_url: the server's API root, e.g. http://127.0.0.1:8000/v1.
        api_key_env: the environment variable with the key; a local server needs none (a placeholder is sent).
        timeout_s: per-request timeout.
        seed, max_new_tokens: sent as `seed` and `max_tokens`; temperature is 0.
        rubric: its schema goes in `response_format` (json_schema) while the server takes it; a server that
            refuses the field (400 naming it) is asked again without it from then on.
    """

    backend = "openai"

    def __init__(self, model: str, *, base_url: str, api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 120.0,
                 seed: int = 0, max_new_tokens: int | None = None, rubric: Rubric = TWO_SCORE) -> None:
        import openai  # lazy: the client library is only needed by a job that uses this backend

        if not model or not base_url:
            raise ValueError("OpenAIJudge needs a model name and the server's base_url (…/v1)")
        self.model, self.base_url, self.seed, self.max_new_tokens = model, base_url, seed, max_new_tokens
        self.rubric = rubric
        self.use_schema = rubric.schema is not None
        # The client's own retries are off: judge_items retries with its own backoff and counts attempts.
        self._client = openai.OpenAI(base_url=base_url, api_key=environment_secret(api_key_env) or "not-needed",
                                     timeout=timeout_s, max_retries=0)
        self._digest: str | None = None

    def _translate(self, e: Exception) -> JudgeError:
        import openai  # lazy: as in __init__

        where = f"the OpenAI-compatible server at {self.base_url}"
        if isinstance(e, openai.APITimeoutError):
            return JudgeUnavailable(f"{where} did not answer in time", "timeout")
        if isinstance(e, openai.APIConnectionError):
            return JudgeUnavailable(f"cannot reach {where} ({type(e.__cause__ or e).__name__}): is it running?",
                                    "connection")
        if isinstance(e, (openai.AuthenticationError, openai.PermissionDeniedError)):
            return JudgeFatal(f"{where} refused the key ({e.status_code}): set the environment variable the "
                              f"spec's api_key_env names")
        if isinstance(e, openai.NotFoundError):
            return JudgeModelMissing(f"judge model {self.model!r} is not served by {where} ({e.status_code}): "
                                     f"check `GET {self.base_url.rstrip('/')}/models`")
        if isinstance(e, openai.APIStatusError):
            if is_transient_status(e.status_code):
                return JudgeUnavailable(f"{where} answered {e.status_code}: {e.message}", "server_error")
            return JudgeError(f"{where} refused the request ({e.status_code}): {e.message}")
        return JudgeError(f"{type(e).__name__}: {e}")

    def digest(self) -> str | None:
        """The model's entry in `GET /models` (servers report no content digest); None if not listed there.

        Raises:
            JudgeModelMissing: the server lists models, and not this one.
        """
        if self._digest is None:
            import openai  # lazy: as in __init__
            try:
                listed = list(self._client.models.list())
            except openai.NotFoundError:
                return None  # a server without /models: nothing to check against
            except Exception as e:  # noqa: BLE001 - translated into the judge's own errors
                raise self._translate(e) from e
            entry = next((m for m in listed if m.id == self.model), None)
            if entry is None:
                if listed:
                    raise JudgeModelMissing(f"judge model {self.model!r} is not served by {self.base_url}: it "
                                            f"serves {', '.join(m.id for m in listed[:5])}")
                return None
            raw = json.dumps(entry.model_dump(mode="json", exclude={"status"}), sort_keys=True)
            self._digest = "models:" + hashlib.sha256(raw.encode()).hexdigest()[:16]
        return self._digest

    def _create(self, messages: list[dict[str, str]]):
        kwargs: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": 0, "seed": self.seed}
        if self.max_new_tokens is not None:
            kwargs["max_tokens"] = self.max_new_tokens
        if self.use_schema:
            kwargs["response_format"] = {"type": "json_schema", "json_schema": {
                "name": f"{self.rubric.name}_verdict".replace("-", "_"), "schema": self.rubric.schema}}
        return self._client.chat.completions.create(**kwargs)

    def ask(self, messages: list[dict[str, str]]) -> JudgeAnswer:
        import openai  # lazy: as in __init__
        try:
            try:
                out = self._create(messages)
            except openai.BadRequestError as e:
                if not (self.use_schema and "response_format" in str(e)):
                    raise
                self.use_schema = False  # this server does not take JSON-schema output: plain text from now on
                out = self._create(messages)
        except Exception as e:  # noqa: BLE001 - translated into the judge's own errors
            raise self._translate(e) from e
        if not out.choices:
            raise JudgeError(f"the server at {self.base_url} answered with no choices")
        choice = out.choices[0]
        msg = choice.message
        # Reasoning servers put the thinking beside the content (DeepSeek, vLLM: reasoning_content; some: reasoning).
        thinking = getattr(msg, "reasoning_content", None) or getattr(msg, "reasoning", None)
        return JudgeAnswer(msg.content or "", thinking if isinstance(thinking, str) else None, choice.finish_reason)

    def close(self) -> None:
        self._client.close()
