from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from core.paths import SpecPath
from core.specs.base import Spec, model_paths


class ClassifyItem(Spec):
    id: str = Field(min_length=1, max_length=512)
    text: str
    label: str | None = Field(default=None, description="gold label, when known (evaluation)")


class ShardRange(Spec):
    """The part of a sharded classify job's items that one shard child classifies (set by the parent job)."""

    index: int = Field(ge=0, description="shard number, 0-based")
    count: int = Field(ge=1, description="shards of the parent job")
    start: int = Field(ge=0, description="first item (position among the input's valid items, after limit)")
    stop: int = Field(ge=1, description="one past the last item")


class ClassifySpec(Spec):
    """Classify a batch of texts with a base model and optionally an adapter."""

    items: list[ClassifyItem] | None = None
    input_file: str | None = Field(default=None, description="JSONL (id, text per line) or CSV")
    dataset_id: int | None = Field(default=None, ge=1, description="classify a prepared dataset's split")
    split: Literal["train", "validation", "test"] = "test"
    limit: int | None = Field(default=None, ge=1)
    model: str = "smollm2-135m"
    adapter_id: int | None = Field(default=None, ge=1, description="model artifact id of a registered adapter")
    label_names: list[str] | None = None
    instruction: str | None = None
    template: Literal["alpaca", "chat"] | None = None
    mode: Literal["score", "generate"] = Field(
        default="score", description="score: the label whose tokens are most likely after the prompt (always a "
        "valid label); generate: free generation parsed to a label (may name none)")
    batch_size: int = Field(default=16, ge=1, le=1024)
    max_new_tokens: int = Field(default=16, ge=1, le=1024, description="generate mode: most tokens generated")
    temperature: float = Field(default=0.0, ge=0, description="generate mode: 0 is greedy")
    top_p: float = Field(default=1.0, gt=0, le=1)
    repetition_penalty: float = Field(default=1.0, gt=0)
    max_input_tokens: int | None = Field(
        default=None, ge=8, description="most tokens of each item's text; a longer text is cut at the end and the "
        "item flagged 'truncated' (the prompt template is never cut). Default: what the model's context allows")
    seed: int = Field(default=0, description="sampling seed for mode='generate' with temperature > 0")
    dtype: Literal["auto", "bf16", "fp32", "fp16"] = "auto"
    device: str = "auto"
    shard: ShardRange | None = Field(
        default=None, description="set by a sharded parent job on its children (workers/jobs/shards.py): classify only "
        "items start..stop-1 of the input. A shard child's inline `items` are already that slice")

    @model_validator(mode="after")
    def _one_input(self) -> "ClassifySpec":
        given = [x is not None for x in (self.items, self.input_file, self.dataset_id)]
        if sum(given) != 1:
            raise ValueError("give exactly one of items, input_file or dataset_id")
        if self.items is not None and not self.items:
            raise ValueError("items is empty: a batch needs at least one item")
        return self

    def paths(self) -> list[SpecPath]:
        """The input file, and the model where it names a local folder."""
        paths = [SpecPath("input_file", self.input_file)] if self.input_file else []
        return paths + model_paths("model", self.model)
