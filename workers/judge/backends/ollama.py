"""A judge model served by Ollama (default `deepseek-r1:8b`), through the official `ollama` client: the
answer constrained by the rubric's JSON schema (`format=`), temperature 0 and a fixed seed."""
from __future__ import annotations

import hashlib
from typing import Any

from core.settings import get_settings
from workers.judge.backends.base import JudgeAnswer
from workers.judge.errors import JudgeError, JudgeModelMissing, JudgeUnavailable, is_transient_status
from workers.judge.rubrics import TWO_SCORE, Rubric

OLLAMA_DEFAULT_MODEL = "deepseek-r1:8b"


def _same_ollama_model(a: str, b: str) -> bool:
    norm = lambda s: s if ":" in s else s + ":latest"  # noqa: E731
    return norm(a) == norm(b)


class OllamaJudge:
    """A judge model served by Ollama, through the official client.

    Args:
        model: an Ollama model tag (pull it first: `ollama pull deepseek-r1:8b`).
        host: the server (default: OLLAMA_HOST from the settings).
        timeout_s: the client's timeout; streamed, it bounds the wait between chunks.
        seed: sampling seed (with temperature 0 the answer is deterministic per server build).
        think: Ollama's think flag; None leaves the model's default. Reasoning, in `message.thinking`
            or in `<think>` blocks, is never read as the answer.
        stream: stream the answer (recommended for thinking models).
        max_new_tokens: `num_predict` cap, or None for none.
        rubric: the rubric's schema goes in `format=` (none for raschka) and its `num_ctx` in the options.
    """

    backend = "ollama"

    def __init__(self, model: str = OLLAMA_DEFAULT_MODEL, *, host: str | None = None, timeout_s: float = 120.0,
                 seed: int = 0, think: bool | None = None, stream: bool = True,
                 max_new_tokens: int | None = None, rubric: Rubric = TWO_SCORE) -> None:
        import ollama  # lazy: the client library is only needed by a job that uses this backend

        if not model:
            raise ValueError("OllamaJudge needs a model tag, e.g. deepseek-r1:8b")
        if host is None:
            host = get_settings().ollama_host
        self.model, self.host, self.seed, self.think, self.stream = model, host, seed, think, stream
        self.max_new_tokens, self.rubric = max_new_tokens, rubric
        self._client = ollama.Client(host=host, timeout=timeout_s)
        self._digest: str | None = None

    def _missing(self) -> JudgeModelMissing:
        return JudgeModelMissing(f"judge model {self.model!r} is not available on the Ollama server at {self.host}: "
                                 f"run `ollama pull {self.model}` there (or pick another judge_model)")

    def _translate(self, e: Exception) -> JudgeError:
        import httpx  # lazy: as in __init__
        import ollama

        if isinstance(e, ollama.ResponseError):
            if e.status_code == 404:
                return self._missing()
            if e.status_code == -1:  # an {"error": ...} line inside a 200 stream
                return JudgeUnavailable(f"Ollama at {self.host} broke off its answer: {e.error}", "stream_error")
            if is_transient_status(e.status_code):
                return JudgeUnavailable(f"Ollama at {self.host} answered {e.status_code}: {e.error}", "server_error")
            return JudgeError(f"Ollama at {self.host} refused the request ({e.status_code}): {e.error}")
        if isinstance(e, httpx.TimeoutException):
            return JudgeUnavailable(f"Ollama at {self.host} did not answer in time ({type(e).__name__})", "timeout")
        if isinstance(e, (ConnectionError, httpx.TransportError)):
            return JudgeUnavailable(f"cannot reach Ollama at {self.host} ({type(e).__name__}): start it with "
                                    f"`ollama serve` or set OLLAMA_HOST", "connection")
        return JudgeError(f"{type(e).__name__}: {e}")

    def digest(self) -> str | None:
        if self._digest is None:
            try:
                listed = self._client.list()
                for m in listed.models:
                    if m.model and _same_ollama_model(m.model, self.model) and m.digest:
                        self._digest = m.digest
                        return self._digest
                # Not listed locally (a remote or aliased model?): /api/show decides whether it exists.
                shown = self._client.show(self.model)
                h = hashlib.sha256((shown.modelfile or "").encode() + (shown.template or "").encode()
                                   + (shown.parameters or "").encode())
                self._digest = "show:" + h.hexdigest()[:16]
            except Exception as e:  # noqa: BLE001 - translated into the judge's own errors
                raise self._translate(e) from e
        return self._digest

    def ask(self, messages: list[dict[str, str]]) -> JudgeAnswer:
        options: dict[str, Any] = {"temperature": 0, "seed": self.seed}
        if self.max_new_tokens is not None:
            options["num_predict"] = self.max_new_tokens
        if self.rubric.num_ctx is not None:
            options["num_ctx"] = self.rubric.num_ctx
        try:
            out = self._client.chat(model=self.model, messages=messages, format=self.rubric.schema,
                                    options=options, think=self.think, stream=self.stream)
            if self.stream:
                content, thinking, done_reason = [], [], None
                for part in out:
                    content.append(part.message.content or "")
                    thinking.append(part.message.thinking or "")  # None on models or servers without it
                    done_reason = part.done_reason or done_reason
                return JudgeAnswer("".join(content), "".join(thinking) or None, done_reason)
            return JudgeAnswer(out.message.content or "", out.message.thinking, out.done_reason)
        except JudgeError:
            raise
        except Exception as e:  # noqa: BLE001 - translated into the judge's own errors
            raise self._translate(e) from e

    def close(self) -> None:
        self._client.close()
