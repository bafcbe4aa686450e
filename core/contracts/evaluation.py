"""`EvaluationDoc`: an evaluation's results, as the evaluate job computes them and the store keeps them
(table `evaluations`, column `document`); the report, `eval show`, the API and the dashboard read it."""
from __future__ import annotations

from typing import Any

from core.contracts.base import Contract
from core.contracts.judge import JudgeSummary


class EvaluationDoc(Contract):
    """Per-model metrics with confidence intervals, paired comparisons against the base, judge summaries,
    the classical baseline, and what could not be computed (never silently missing)."""

    name: str | None = None
    label_names: list[str]
    base: str
    models: dict[str, dict[str, Any]]
    comparisons: dict[str, dict[str, Any]] = {}
    generate: dict[str, dict[str, Any]] = {}
    generate_comparisons: dict[str, dict[str, Any]] = {}
    judge: dict[str, JudgeSummary] = {}  # model name -> its judge run over the task's answers
    judge_comparisons: dict[str, dict[str, Any]] = {}
    judge_validity: dict[str, Any] | None = None
    dialogue: dict[str, JudgeSummary] = {}  # model name -> its judge run over the general instructions
    dialogue_comparisons: dict[str, dict[str, Any]] = {}
    baseline: dict[str, Any] | None = None
    missing: list[str] = []
    spec: dict[str, Any] | None = None
    models_used: dict[str, Any] | None = None
    loss_history: list[dict[str, Any]] | None = None
