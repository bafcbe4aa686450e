from __future__ import annotations

from pydantic import Field

from core.specs.base import Spec


class EvaluateSpec(Spec):
    """Compare models on the same labeled items: metrics with confidence intervals, paired tests."""

    classify_job_ids: list[int] = Field(min_length=1, description="score-mode classify jobs, one per model")
    generate_job_ids: list[int] = Field(default_factory=list, description="generate-mode jobs (instruction following)")
    judge_job_ids: list[int] = Field(default_factory=list)
    name: str | None = None
    bootstrap: int = Field(default=1000, ge=0, le=100_000)
    seed: int = 0
    report: bool = Field(default=True, description="write the HTML report and plots")
