"""The LLM judge: score free-form responses under a rubric, and check first whether the judge can be trusted.

- `rubrics`: how a judge is asked and how its answer is read (two-score, raschka).
- `backends`: Ollama, any OpenAI-compatible server, or a local transformers model, behind one protocol.
- `errors`: what can go wrong, and which failures are retried.
- `scoring`: `judge_items`, with retries, counting every failure (an unscored item is kept, never dropped).
- `controls`: the validity check, a control set built from the task itself (`judge_validity`).
- `summary`: `summarize_judgements` (a `JudgeSummary`), `compare_judgements` and the validity sentences.
- `dialogue`: the general-instruction set and a model's answers to it.
- `job`: `run_judge`, the judge job.
"""
from __future__ import annotations

from workers.judge.backends import (LOCAL_DEFAULT_MAX_NEW_TOKENS, LOCAL_DEFAULT_MODEL, OLLAMA_DEFAULT_MODEL, Judge,
                                    JudgeAnswer, LocalJudge, OllamaJudge, OpenAIJudge, make_judge, score_distribution)
from workers.judge.controls import AGREE_POINTS, control_items, judge_validity
from workers.judge.dialogue import DIALOGUE_FILE, answer_dialogue, dialogue_items
from workers.judge.errors import (JudgeError, JudgeFatal, JudgeInputError, JudgeModelMissing, JudgeUnavailable,
                                  Unscorable)
from workers.judge.job import ClassifyRun, JudgeInputs, run_judge
from workers.judge.rubrics import (JUDGE_SCHEMA, RASCHKA, RUBRIC, RUBRIC_SHA, RUBRIC_VERSION, RUBRICS, TWO_SCORE,
                                   Judgement, Rubric, judge_messages, parse_judgement, parse_raschka, raschka_prompt,
                                   split_thinking)
from workers.judge.scoring import judge_items, sample_items
from workers.judge.summary import (compare_judgements, not_evidence_reason, summarize_judgements, validity_cell,
                                   validity_line, validity_sentence)

__all__ = [
    "AGREE_POINTS", "DIALOGUE_FILE", "JUDGE_SCHEMA", "LOCAL_DEFAULT_MAX_NEW_TOKENS", "LOCAL_DEFAULT_MODEL",
    "OLLAMA_DEFAULT_MODEL", "RASCHKA", "RUBRIC", "RUBRIC_SHA", "RUBRIC_VERSION", "RUBRICS", "TWO_SCORE",
    "ClassifyRun", "Judge", "JudgeAnswer", "JudgeError", "JudgeFatal", "JudgeInputError", "JudgeInputs",
    "JudgeModelMissing", "JudgeUnavailable", "Judgement", "LocalJudge", "OllamaJudge", "OpenAIJudge", "Rubric",
    "Unscorable", "answer_dialogue", "compare_judgements", "control_items", "dialogue_items", "judge_items",
    "judge_messages", "judge_validity", "make_judge", "not_evidence_reason", "parse_judgement", "parse_raschka",
    "raschka_prompt", "run_judge", "sample_items", "score_distribution", "split_thinking", "summarize_judgements",
    "validity_cell", "validity_line", "validity_sentence",
]
