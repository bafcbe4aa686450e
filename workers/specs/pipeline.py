from __future__ import annotations

from pydantic import Field

from workers.specs.base import Spec
from workers.specs.prep import PrepSpec


class PipelineSpec(Spec):
    """The main job: prepare, fine-tune, classify (base and adapter), judge, evaluate, report."""

    name: str = "agnews"
    prep: PrepSpec = Field(default_factory=PrepSpec)
    model: str = "smollm2-135m"
    train: dict = Field(default_factory=dict, description="TrainSpec fields other than dataset_id and model")
    classify: dict = Field(default_factory=dict, description="ClassifySpec fields for the score-mode runs")
    eval_limit: int | None = Field(default=None, ge=1, description="classify at most this many test items")
    generate: dict = Field(default_factory=dict, description="generate-mode run (instruction following)")
    generate_limit: int | None = Field(default=100, ge=0)
    judge: dict | None = Field(default_factory=dict, description="JudgeSpec fields; null to skip judging")
    reuse_adapter: bool = False
