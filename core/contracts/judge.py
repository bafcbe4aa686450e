"""The judge's two contracts.

- `JudgeRow`: one judged item, as the judge writes it and the store keeps it (table `judge_scores`).
- `JudgeSummary`: what a judge run's rows add up to (`workers.judge.summarize_judgements` builds it), kept
  in a judge job's result and in the evaluation document (`EvaluationDoc.judge` / `.dialogue`), read by the
  report. Summaries stored before a field existed still load: every later field has a default.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, field_validator, model_serializer

from core.contracts.base import Contract, StoreRow

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


# --------------------------------------------------------------------------------------------------
# JudgeSummary

SCALES = ("coherence", "following", "score")  # every scale a rubric can have; each is a JudgeRow field
DEFAULT_SCALES = ["coherence", "following"]  # the two-score rubric's, and all a summary had before `scales`


class _Part(BaseModel):
    """A nested part of a summary: strict about unknown keys, like the contract around it."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ScaleSummary(_Part):
    """One scale's scores over the items that scored it (`core.stats.mean_ci`)."""

    mean: float
    ci: list[float] | None  # bootstrap 95% interval of the mean; None when no bootstrap was run
    std: float
    n: int


class SelfAgreement(_Part):
    """How often a repeated control item scored within `within_points` of its first score."""

    n: int
    k_within: int
    within_points: float
    rate: float | None
    ci: list[float] | None  # Wilson 95%
    mean_abs_diff: float | None


class JudgeValidity(_Part):
    """The control set's verdict: how often the judge scores a pair's correct answer strictly above its
    wrong one on `scale` (ties and unscored answers count against it), against chance."""

    scale: str
    n_pairs: int
    k_correct: int
    n_ties: int
    n_unscored_pairs: int
    rate: float | None
    ci: list[float] | None  # Wilson 95%
    chance: float = 0.5
    beats_chance: bool  # the interval's lower end is above chance
    self_agreement: SelfAgreement | None = None


class LatencySummary(_Part):
    mean: float
    p50: float
    max: float


class UnscoredExample(_Part):
    item_id: str | None
    error: str | None


class JudgeSummary(Contract):
    """A judge run over its items (control rows summarised apart, in `validity`).

    The scale fields (`coherence`, `following`, `score`) hold the mean with its interval over the items
    that scored that scale, or None when none did; only the rubric's own `scales` are written out.
    """

    n: int  # items judged (controls not counted)
    n_scored: int
    n_partial: int = 0  # some of the rubric's scales scored, the rest left unscored
    n_unscored: int
    unscored_reasons: dict[str, int]  # error kind -> items
    unscored_examples: list[UnscoredExample]  # the first few, with their errors
    scales: list[str] = DEFAULT_SCALES
    coherence: ScaleSummary | None = None
    following: ScaleSummary | None = None
    score: ScaleSummary | None = None
    scores: dict[str, list[float]]  # scale -> every score given
    histogram: dict[str, list[int | float]]  # "edges" (0, 10, ..., 100), then scale -> counts per bin
    spread: dict[str, float] | None = None  # probability scoring: mean standard deviation per scale
    validity: JudgeValidity | None = None  # None: no control set was scored
    # Whether the judge's scores are evidence (it beat chance on its control set); None: stored before
    # the control set existed.
    evidence: bool | None = None
    rubric: str | None = None
    scoring: str | None = None  # "text" | "probability"
    backend: str | None = None
    judge_model: str | None = None
    model_digest: str | None = None
    rubric_version: str | None = None
    latency_ms: LatencySummary | None = None

    def scale(self, name: str) -> ScaleSummary | None:
        """The named scale's summary (None: not a scale, or nothing scored it)."""
        return getattr(self, name) if name in SCALES else None

    @property
    def not_evidence(self) -> bool:
        """The judge was checked and did not beat chance (summaries from before the check are not flagged)."""
        return self.evidence is False

    @field_validator("scales")
    @classmethod
    def _known_scales(cls, scales: list[str]) -> list[str]:
        unknown = [s for s in scales if s not in SCALES]
        if unknown:
            raise ValueError(f"unknown scales {unknown}: a judge scores {', '.join(SCALES)}")
        return scales

    @model_serializer(mode="wrap")
    def _own_scales_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for name in SCALES:
            if name not in self.scales:
                data.pop(name, None)
        return data
