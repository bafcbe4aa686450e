"""The export manifest: `export.json` in every export folder (what it holds, where from, how checked)."""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from core.contracts.base import ArtifactFile

MANIFEST_FILE = "export.json"


class ExportManifest(ArtifactFile):
    """`export.json` in every export folder: what it holds, where it came from, how it was checked.
    Built only in `workers.export.export_adapter`; read with `ExportManifest.load(folder)`."""

    FILE_NAME: ClassVar[str] = MANIFEST_FILE
    WHAT_TO_DO: ClassVar[str] = "export the adapter again (`newslora export ADAPTER_ID`)"

    format: Literal["peft", "merged", "gguf"]
    quant: str | None = None
    adapter_id: int | None = None
    base_model: str
    base_model_digest: str | None = None
    dataset_hash: str | None = None
    label_names: list[str]
    instruction: str
    template: str
    files: dict[str, dict[str, Any]] = {}  # name -> {"bytes", "sha256"}
    verification: dict[str, Any] | None = None
    code_version: str | None = None
