"""`JudgeRow`: one judged item, as the judge writes it and the store keeps it (table `judge_scores`)."""
from __future__ import annotations

from typing import ClassVar, Literal

from core.contracts.base import StoreRow


class JudgeRow(StoreRow):
    """One item's judgement: scored, or unscored with the reason - never dropped, never guessed.

    A scale the judge did not score stays None; it is never filled in from another scale.
    """

    COLUMNS: ClassVar[tuple[str, ...]] = ("item_id", "status", "coherence", "following", "reason", "judge_backend",
                                          "judge_model", "judge_digest", "latency_ms", "raw", "error")
    EXTRA_COLUMN: ClassVar[str | None] = "extra"

    item_id: str
    status: Literal["scored", "unscored"] = "unscored"
    coherence: float | None = None
    following: float | None = None
    reason: str | None = None
    judge_backend: str | None = None  # "ollama" | "local" | "openai" ...
    judge_model: str | None = None
    judge_digest: str | None = None  # the judge model's content digest, so a score names what gave it
    latency_ms: float | None = None
    raw: str | None = None  # the judge's answer as received (cut to a few KB)
    error: str | None = None
    # Carried in the `extra` JSON column:
    error_kind: str | None = None  # why an item is unscored (timeout, unparseable, ...)
    rubric_version: str | None = None
    rubric_sha: str | None = None
    attempts: int = 0
    thinking_chars: int = 0
    parse: str | None = None  # how the verdict was read (json, regex, ...)
