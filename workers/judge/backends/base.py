"""The one protocol every judge backend speaks: `digest()` and `ask(messages) -> JudgeAnswer`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from workers.judge.rubrics import Rubric


@dataclass(frozen=True)
class JudgeAnswer:
    """A judge's reply: its answer, its reasoning when the server split it off, and why it stopped."""

    content: str
    thinking: str | None = None
    done_reason: str | None = None  # why generation stopped, as the server said ("stop", "length", ...)


class Judge(Protocol):
    """A judge backend (`OllamaJudge`, `OpenAIJudge`, `LocalJudge`, or anything that answers like them)."""

    backend: str
    model: str
    rubric: Rubric
    # A backend may also set `max_concurrency` (int) to cap judge_items' thread pool below spec.concurrency,
    # and `score_batch(items) -> list[Judgement]` to score without text (probability scoring).

    def digest(self) -> str | None:
        """A content digest of the judge model (stored with every row).

        Raises:
            JudgeModelMissing: the model is not available.
            JudgeUnavailable: the server could not be reached (transient).
        """

    def ask(self, messages: list[dict[str, str]]) -> JudgeAnswer:
        """One judge answer for the chat messages.

        Raises:
            JudgeUnavailable: transient failure, worth retrying.
            JudgeFatal: nothing can be judged (stops the job).
            JudgeError: any other failure of this one request.
        """
