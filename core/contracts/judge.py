"""`JudgeRow`: one judged item, as the judge writes it and the store keeps it (table `judge_scores`)."""
from __future__ import annotations

from typing import ClassVar, Literal

from core.contracts.base import StoreRow

# What a control row holds: for a classification item the gold label's answer or a wrong label's; for a
# general instruction the reference answer or another item's ("shuffled").
ControlKind = Literal["gold", "wrong", "real", "shuffled"]


class JudgeRow(StoreRow):
    """One item's judgement: scored, or unscored with the reason - never dropped, never guessed.

    A scale the judge did not score stays None; it is never filled in from another scale (a row with some
    of its rubric's scales is "partial"). Control rows (`control` set) are the judge's validity check: the
    same task's correct and wrong answers, scored beside the real items and summarised apart from them.
    """

    COLUMNS: ClassVar[tuple[str, ...]] = ("item_id", "status", "coherence", "following", "reason", "judge_backend",
                                          "judge_model", "judge_digest", "latency_ms", "raw", "error")
    EXTRA_COLUMN: ClassVar[str | None] = "extra"

    item_id: str
    status: Literal["scored", "partial", "unscored"] = "unscored"
    coherence: float | None = None
    following: float | None = None
    reason: str | None = None
    judge_backend: str | None = None  # "ollama" | "local" | "openai"
    judge_model: str | None = None
    judge_digest: str | None = None  # the judge model's content digest, so a score names what gave it
    latency_ms: float | None = None
    raw: str | None = None  # the judge's answer as received (cut to a few KB)
    error: str | None = None
    # Carried in the `extra` JSON column:
    score: float | None = None  # the single 0-100 score of a one-scale rubric (raschka)
    error_kind: str | None = None  # why an item (or a scale) is unscored: timeout, unparseable, truncated, ...
    rubric: str | None = None  # "two-score" | "raschka"
    rubric_version: str | None = None
    rubric_sha: str | None = None
    scoring: Literal["text", "probability"] | None = None  # generated text parsed, or next-token probabilities
    spread: dict[str, float] | None = None  # probability scoring: each scale's standard deviation (0-100 points)
    score_mass: float | None = None  # probability scoring: the least probability any scale put on digit tokens
    attempts: int = 0
    thinking_chars: int = 0
    parse: str | None = None  # how the verdict was read (json, json_in_text, named_scores, integer, expected, ...)
    control: ControlKind | None = None  # set on validity-check rows only
    pair_id: str | None = None  # control rows: the item both answers of a pair belong to
    repeat: int = 0  # control rows scored a second time (self-agreement) have repeat 1
