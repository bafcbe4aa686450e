"""`AdapterMeta`: `newslora.json` beside a PEFT adapter's weights, written by either training backend,
read by classification, dialogue answers and exports."""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from core.contracts.base import ArtifactFile


class AdapterMeta(ArtifactFile):
    """The prompt the adapter was trained with and the base model it belongs to, so serving never
    re-types a prompt and never applies an adapter to another base."""

    FILE_NAME: ClassVar[str] = "newslora.json"
    WHAT_TO_DO: ClassVar[str] = ("newslora cannot tell which prompt template and base model the adapter was "
                                 "trained with; train it with newslora")

    template: str
    instruction: str
    label_names: list[str]
    base_model: str
    base_model_path: str | None = None
    base_model_digest: str
    dataset_hash: str | None = None
    steps: int | None = None
    max_seq_len: int | None = None
    spec: dict[str, Any] | None = None
    code_version: str | None = None
    backend: Literal["peft", "torchtune"] | None = None
    torchtune_version: str | None = None
