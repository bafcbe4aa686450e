from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from core.specs.base import Spec

GGUF_QUANTS = ("f16", "q8_0")  # what workers/export/gguf_writer.py writes


class ExportSpec(Spec):
    """Export a trained adapter: its PEFT folder, a merged checkpoint, or GGUF + an Ollama Modelfile."""

    adapter_id: int = Field(ge=1, description="model artifact id of a registered adapter (`newslora models list`)")
    format: Literal["peft", "merged", "gguf"] = Field(
        default="gguf", description="peft: the adapter folder + newslora metadata; merged: a Hugging Face checkpoint "
        "with the LoRA weights merged in; gguf: the merged model as one GGUF file + an Ollama Modelfile")
    quant: Literal["f16", "q8_0"] | None = Field(
        default=None, description="gguf only: f16 (default; matches the merged model to f16 rounding) or q8_0 "
        "(about half the size)")
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
                             description="gguf: the model's name and file stem (default newslora-adapter<ID>)")
    verify: bool = Field(default=True, description="reload the export as its users will and classify a fixed "
                         "sample of the test split; a failed check fails the export")
    gguf_loader: Literal["auto", "llama.cpp", "transformers"] = Field(
        default="auto", description="gguf: what the check loads the file with: llama.cpp itself (llama-cpp-python, "
        "`make install-llamacpp`), transformers' gguf_file= loader, or auto (llama.cpp where it is installed)")
    verify_samples: int = Field(default=400, ge=1, le=100_000, description="test articles the check classifies")
    min_agreement: float | None = Field(
        default=None, gt=0, le=1, description="share of articles whose label must equal the adapter path's; "
        "default 0.99 (merged, gguf f16) or 0.95 (gguf q8_0)")
    dataset_id: int | None = Field(default=None, ge=1, description="dataset whose test split the check uses "
                                   "(default: the one the adapter was trained on)")
    batch_size: int = Field(default=16, ge=1, le=1024, description="verification: articles per forward pass")
    dtype: Literal["auto", "bf16", "fp32", "fp16"] = Field(
        default="fp32", description="verification: the dtype both the adapter path and the export run in; fp32 "
        "(what plain transformers loads both exports in) so the check measures the export, not bf16 rounding")
    device: str = "auto"

    @model_validator(mode="after")
    def _quant_for_gguf(self) -> "ExportSpec":
        if self.format == "gguf" and self.quant is None:
            self.quant = "f16"
        elif self.format != "gguf" and self.quant is not None:
            raise ValueError(f"quant applies to format 'gguf' only, not {self.format!r}: leave it unset")
        return self
