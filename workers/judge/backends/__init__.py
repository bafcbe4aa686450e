"""Judge backends behind one protocol (`base.Judge`), all given the rubric's messages and read by the
rubric's parser:

- `OllamaJudge` (`ollama.py`): a model served by Ollama, through the official client.
- `OpenAIJudge` (`openai.py`): any OpenAI-compatible chat server.
- `LocalJudge` (`local.py`): a transformers causal LM in-process, text or probability scoring.

`make_judge(spec)` builds the one a judge spec asks for.
"""
from __future__ import annotations

from core.specs.judge import JudgeSpec
from workers.judge.backends.base import Judge, JudgeAnswer
from workers.judge.backends.local import (LOCAL_DEFAULT_MAX_NEW_TOKENS, LOCAL_DEFAULT_MODEL, LocalJudge,
                                         score_distribution)
from workers.judge.backends.ollama import OLLAMA_DEFAULT_MODEL, OllamaJudge
from workers.judge.backends.openai import OpenAIJudge
from workers.judge.rubrics import RUBRICS

__all__ = ["LOCAL_DEFAULT_MAX_NEW_TOKENS", "LOCAL_DEFAULT_MODEL", "OLLAMA_DEFAULT_MODEL", "Judge", "JudgeAnswer",
           "LocalJudge", "OllamaJudge", "OpenAIJudge", "make_judge", "score_distribution"]


def make_judge(spec: JudgeSpec) -> Judge:
    """The judge a spec asks for. For the local backend, the Ollama default model means SmolLM2."""
    rubric = RUBRICS[spec.rubric]
    if spec.backend == "ollama":
        return OllamaJudge(spec.judge_model, host=spec.host, timeout_s=spec.timeout_s, seed=spec.seed,
                           think=spec.think, stream=spec.stream, max_new_tokens=spec.max_new_tokens, rubric=rubric)
    if spec.backend == "openai":
        return OpenAIJudge(spec.judge_model, base_url=spec.base_url or "", api_key_env=spec.api_key_env,
                           timeout_s=spec.timeout_s, seed=spec.seed, max_new_tokens=spec.max_new_tokens,
                           rubric=rubric)
    if spec.backend == "local":
        model = LOCAL_DEFAULT_MODEL if spec.judge_model == OLLAMA_DEFAULT_MODEL else spec.judge_model
        return LocalJudge(model, max_new_tokens=spec.max_new_tokens or LOCAL_DEFAULT_MAX_NEW_TOKENS, rubric=rubric,
                          scoring=spec.scoring)
    raise ValueError(f"unknown judge backend {spec.backend!r}: use 'ollama', 'openai' or 'local'")
