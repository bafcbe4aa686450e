"""Export a trained adapter for use outside newslora: the PEFT folder, a merged checkpoint, or GGUF + an
Ollama Modelfile, each checked by reloading it the way its users will (`job.export_adapter`).

Light on purpose (no torch at import): the API imports `workers.export.archive`, which runs this file.
"""
from core.contracts.export import MANIFEST_FILE, ExportManifest
from workers.export.job import ExportCheckFailed, ExportError, export_adapter

__all__ = ["export_adapter", "ExportError", "ExportCheckFailed", "ExportManifest", "MANIFEST_FILE"]
