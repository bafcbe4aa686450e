"""What a plain job function is handed to report on itself, without knowing of Celery or the store.

A worker passes a `StoreContext` (see `workers/jobs/runner.py`) that writes events to the job row and
sees cancel requests; tests and direct calls pass a `LocalContext`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

from core.contracts.judge import JudgeRow
from core.contracts.prediction import PredictionRow

log = logging.getLogger("newslora")


class JobCancelled(Exception):
    """Raised by `check_cancel()` at a step boundary when the job was cancelled."""


class JobContext(Protocol):
    job_id: int | None
    work_dir: Path

    def event(self, message: str, *, level: str = "info", metrics: dict[str, Any] | None = None) -> None:
        """Record a job event (shown by `newslora jobs show` and the client's event list)."""

    def progress(self, done: float, total: float | None = None, *, message: str | None = None,
                 **metrics: Any) -> None:
        """Record progress (done of total, plus metrics such as loss or items/s); rate-limited."""

    def check_cancel(self) -> None:
        """Raise JobCancelled if the job was cancelled. Call it at each step boundary."""

    def save_predictions(self, rows: Sequence[PredictionRow]) -> None:
        """Store per-item predictions (idempotent on (job, item_id): a re-run overwrites, never duplicates)."""

    def stored_predictions(self) -> list[PredictionRow]:
        """Every prediction stored for this job so far, by any attempt (a resumed job reports over all)."""

    def done_item_ids(self) -> set[str]:
        """Item ids that already have a stored prediction (so a re-delivered job skips them)."""

    def save_judge_rows(self, rows: Sequence[JudgeRow]) -> None:
        """Store judged items (idempotent on (job, item_id)): the judge's own sink."""


@dataclass
class LocalContext:
    """A context for direct calls and tests: keeps events and predictions in memory."""

    work_dir: Path = field(default_factory=lambda: Path.cwd())
    job_id: int | None = None
    cancel_after_checks: int | None = None  # tests: cancel at the N-th check_cancel()
    events: list[dict[str, Any]] = field(default_factory=list)
    predictions: dict[str, dict[str, Any]] = field(default_factory=dict)
    judge_rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    _checks: int = 0

    def event(self, message: str, *, level: str = "info", metrics: dict[str, Any] | None = None) -> None:
        self.events.append({"level": level, "message": message, "metrics": metrics or {}, "time": time.time()})
        log.log(logging.WARNING if level in ("warning", "error") else logging.INFO, "%s %s", message, metrics or "")

    def progress(self, done: float, total: float | None = None, *, message: str | None = None,
                 **metrics: Any) -> None:
        self.event(message or "progress", metrics={"done": done, "total": total, **metrics})

    def check_cancel(self) -> None:
        self._checks += 1
        if self.cancel_after_checks is not None and self._checks >= self.cancel_after_checks:
            raise JobCancelled("cancelled")

    def save_predictions(self, rows: Sequence[PredictionRow]) -> None:
        for r in rows:
            row = PredictionRow.model_validate(r)
            self.predictions[row.item_id] = row.model_dump(mode="json", exclude={"format_version"})

    def stored_predictions(self) -> list[PredictionRow]:
        return sorted((PredictionRow.model_validate(r) for r in self.predictions.values()), key=lambda r: r.seq)

    def done_item_ids(self) -> set[str]:
        return set(self.predictions)

    def save_judge_rows(self, rows: Sequence[JudgeRow]) -> None:
        for r in rows:
            row = JudgeRow.model_validate(r)
            self.judge_rows[row.item_id] = row.model_dump(mode="json", exclude={"format_version"})
