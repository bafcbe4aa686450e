"""`MetricsRow`: one line of a training run's `metrics.jsonl` (a step, or a validation), written by
either backend, read by the report's curves and the dashboard."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from core.contracts.base import Contract, ContractError

METRICS_FILE = "metrics.jsonl"


class MetricsRow(Contract):
    """A training step (`type` "step": loss, lr, tokens) or a validation (`type` "eval": val_loss,
    val_accuracy) with the wall-clock seconds of training so far, so accuracy can be plotted against time."""

    type: Literal["step", "eval"] = "step"
    step: int
    train_s: float | None = None  # training seconds so far, all resumed sessions (time to accuracy)
    wall_s: float | None = None  # this session's wall time so far (validation and checkpoints included)
    # step rows
    loss: float | None = None
    lr: float | None = None
    tokens: int | None = None
    tokens_per_s: float | None = None
    step_s: float | None = None
    # eval rows
    val_loss: float | None = None
    val_accuracy: float | None = None
    val_items: int | None = None
    eval_s: float | None = None


def append_metrics(run_dir: Path, rows: list[MetricsRow]) -> None:
    with (Path(run_dir) / METRICS_FILE).open("a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(row.model_dump_json(exclude_none=True) + "\n")


def read_metrics(run_dir: Path) -> list[MetricsRow]:
    """The run's rows in order ([] when it wrote none).

    Raises:
        ContractError: a line is not a metrics row (naming the file and line).
    """
    f = Path(run_dir) / METRICS_FILE
    if not f.is_file():
        return []
    rows = []
    for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except ValueError as e:
            raise ContractError(f"{f} line {n} is not JSON ({e})") from None
        rows.append(MetricsRow.validated(raw, where=f"{f} line {n}"))
    return rows


def truncate_metrics_after(run_dir: Path, step: int) -> None:
    """Drop rows past `step` (a resumed run re-does those steps)."""
    f = Path(run_dir) / METRICS_FILE
    if f.is_file():
        keep = [r for r in read_metrics(run_dir) if r.step <= step]
        f.write_text("".join(r.model_dump_json(exclude_none=True) + "\n" for r in keep), encoding="utf-8")
