"""`DatasetMeta`: a prepared dataset folder's `meta.json`, written by the prep job, read by training,
classification and evaluation."""
from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from core.contracts.base import ArtifactFile


class SplitFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: str
    records: int
    sha256: str


class DatasetMeta(ArtifactFile):
    """What a prep job wrote: the label set and prompt every consumer must use, the split files and
    their hashes, and the counts of what was cleaned or dropped on the way."""

    FILE_NAME: ClassVar[str] = "meta.json"
    WHAT_TO_DO: ClassVar[str] = "it is not a prepared dataset; make one with a prep job (`newslora prep ...`)"

    name: str
    hash: str | None = None  # sha256 over the split files' sha256s
    created_at: str
    code_version: str
    sources: dict[str, dict[str, Any]]
    label_names: list[str]
    label_map: dict[str, int]
    label_source: str = "spec"  # "spec" (given or AG News's) or "data" (string labels found in the data)
    template: str
    instruction: str
    splits: dict[str, SplitFile] = {}
    counts: dict[str, dict[str, int]]
    token_lengths: dict[str, Any] | None = None
    cleaned: dict[str, int] = {}
    dropped: dict[str, int] = {}
    dropped_by_source: dict[str, dict[str, int]] = {}
    spec: dict[str, Any]
    timings_s: dict[str, float] = {}
