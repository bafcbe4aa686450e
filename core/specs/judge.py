from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from core.paths import SpecPath
from core.specs.base import Spec, model_paths


class JudgeSpec(Spec):
    """Score free-form responses with an LLM judge (Ollama, any OpenAI-compatible server, or a local model).

    Every judge job also scores a control set built from the same task (the gold and a wrong answer to the
    same article; a real and a shuffled answer to the same instruction), so the evaluation can say whether
    the judge tells them apart before its scores are read as evidence.
    """

    classify_job_id: int | None = Field(default=None, ge=1, description="a generate-mode classify job to judge")
    dialogue: bool = Field(default=False, description="judge the shipped general-instruction set instead")
    model: str = Field(default="smollm2-135m", description="dialogue: the model that answers")
    adapter_id: int | None = Field(default=None, ge=1, description="dialogue: the adapter that answers")
    backend: Literal["ollama", "local", "openai"] = "ollama"
    judge_model: str = Field(default="deepseek-r1:8b",
                             description="Ollama tag, OpenAI-compatible model name, or a local preset/folder")
    rubric: Literal["two-score", "raschka"] = Field(
        default="two-score", description="two-score: coherence and instruction following, 0-100 each; raschka: "
                                         "the reference project's single 0-100 score prompt, verbatim")
    scoring: Literal["text", "probability"] = Field(
        default="text", description="text: generate and parse the verdict; probability (local backend only): "
                                    "the expected score under the judge's next-token distribution, one forward "
                                    "pass per item, never unparseable")
    host: str | None = Field(default=None, description="Ollama host (default OLLAMA_HOST)")
    base_url: str | None = Field(default=None, description="openai: the server's base URL, e.g. http://127.0.0.1:8000/v1")
    api_key_env: str = Field(default="OPENAI_API_KEY", description="openai: the environment variable holding the key "
                                                                   "(a local server needs none)")
    sample: int | None = Field(default=50, ge=1, description="judge at most this many items")
    control_pairs: int = Field(default=20, ge=0, le=1000,
                               description="validity check: correct/wrong answer pairs the judge also scores (0: none, "
                                           "and its scores are then labelled as not evidence)")
    control_repeats: int = Field(default=5, ge=0, le=1000,
                                 description="control pairs scored a second time, for the judge's self-agreement")
    seed: int = 0
    concurrency: int = Field(default=2, ge=1, le=64)
    batch_size: int = Field(default=8, ge=1, le=256, description="probability scoring: items per forward pass")
    retries: int = Field(default=3, ge=0, le=20)
    timeout_s: float = Field(default=120.0, gt=0, description="per-request read timeout (streamed: between chunks)")
    backoff_s: float = Field(default=1.0, ge=0, le=60, description="first retry delay; doubles on each retry")
    stream: bool = Field(default=True, description="Ollama: stream the answer, so a long think never hits the timeout")
    think: bool | None = Field(default=None, description="Ollama think flag (None: the model's default)")
    max_new_tokens: int | None = Field(default=None, ge=1, le=32768,
                                       description="cap on judge output tokens (local default 128; servers none)")
    answer_max_new_tokens: int = Field(default=128, ge=1, le=4096,
                                       description="dialogue: tokens the answering model may write")

    @model_validator(mode="after")
    def _check(self) -> "JudgeSpec":
        if self.scoring == "probability" and self.backend != "local":
            raise ValueError("scoring=probability reads the judge model's next-token distribution, so it needs "
                             "backend=local (servers return text): use scoring=text with ollama or openai")
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend=openai needs base_url, e.g. http://127.0.0.1:8000/v1 (the server's /v1 root)")
        return self

    def paths(self) -> list[SpecPath]:
        """The answering model (dialogue), and the judge model of the local backend."""
        judge = model_paths("judge_model", self.judge_model) if self.backend == "local" else []
        return model_paths("model", self.model) + judge
