from __future__ import annotations

from typing import Literal

from pydantic import Field

from workers.specs.base import Spec


class JudgeSpec(Spec):
    """Score free-form responses with an LLM judge (Ollama, or a local transformers model)."""

    classify_job_id: int | None = Field(default=None, ge=1, description="a generate-mode classify job to judge")
    dialogue: bool = Field(default=False, description="judge the shipped general-instruction set instead")
    model: str = Field(default="smollm2-135m", description="dialogue: the model that answers")
    adapter_id: int | None = Field(default=None, ge=1, description="dialogue: the adapter that answers")
    backend: Literal["ollama", "local"] = "ollama"
    judge_model: str = Field(default="deepseek-r1:8b", description="Ollama model, or a preset for local")
    host: str | None = Field(default=None, description="Ollama host (default OLLAMA_HOST)")
    sample: int | None = Field(default=50, ge=1, description="judge at most this many items")
    seed: int = 0
    concurrency: int = Field(default=2, ge=1, le=64)
    retries: int = Field(default=3, ge=0, le=20)
    timeout_s: float = Field(default=120.0, gt=0, description="per-request read timeout (streamed: between chunks)")
    backoff_s: float = Field(default=1.0, ge=0, le=60, description="first retry delay; doubles on each retry")
    stream: bool = Field(default=True, description="Ollama: stream the answer, so a long think never hits the timeout")
    think: bool | None = Field(default=None, description="Ollama think flag (None: the model's default)")
    max_new_tokens: int | None = Field(default=None, ge=1, le=32768,
                                       description="cap on judge output tokens (local default 128; Ollama none)")
    answer_max_new_tokens: int = Field(default=128, ge=1, le=4096,
                                       description="dialogue: tokens the answering model may write")
