"""`TrainResult`: what a training run returns (either backend), stored as the `result` of its train job;
read by the pipeline (`adapter_id`), `newslora jobs show`, the API and the dashboard."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from core.contracts.base import Contract


class TimeBudget(BaseModel):
    """What a run with `train.max_minutes` fitted into its budget (the PEFT loop's plan, made from its first
    steps' measured speed and its first validation's time, revised at each validation)."""

    model_config = ConfigDict(extra="forbid")

    max_minutes: float
    planned_steps: int  # the schedule's length as last planned (the cosine decay ends there)
    step_s: float  # measured seconds per optimizer step when last planned
    val_s: float  # measured seconds per validation
    validations: int  # validations run, the final one included
    used_s: float  # wall seconds from the trainer's start to its last step (all sessions)


class TrainMetrics(BaseModel):
    """The run's summary figures. Losses are mean cross-entropy per target token; validation scores the
    adapter as a classify job does (loss over label + EOS, label-scoring accuracy)."""

    model_config = ConfigDict(extra="forbid")

    train_loss: float | None  # mean of the last (up to) 10 steps' losses
    train_loss_first: float | None = None  # torchtune: the first step's loss
    val_loss: float | None = None  # at the last validation
    val_accuracy: float | None = None
    best_val_loss: float | None = None
    tokens: int  # real tokens trained on (padding excluded; PEFT loop: the shared prefix once per row)
    train_s: float  # PEFT loop: optimizer steps over all resumed sessions; torchtune: the recipe subprocess
    tokens_per_s: float | None = None
    wall_s: float  # this session's wall time
    examples: int
    epochs: float
    dtype: str
    device: str
    stop_reason: Literal["completed", "early_stopping", "time_budget"] = "completed"
    best_step: int | None = None  # keep_best: the validated step whose weights were exported
    budget: TimeBudget | None = None  # max_minutes: what the run fitted into it


class EvalPoint(BaseModel):
    """One validation during the run (the eval rows of metrics.jsonl, less `type`)."""

    model_config = ConfigDict(extra="forbid")

    step: int
    val_loss: float
    val_accuracy: float
    val_items: int
    eval_s: float
    train_s: float | None = None  # PEFT loop: training seconds so far (time to accuracy)
    wall_s: float | None = None  # PEFT loop: this session's wall time so far


class TrainResult(Contract):
    """A finished run: where its adapter is, what it was trained from (the prompt and labels a classify
    job must use, the base model's digest, the dataset's hash), how far it went and how it scored.

    `adapter_id` is None when the plain function returns; the train job sets it to the adapter artifact
    it registered before storing the result.
    """

    adapter_id: int | None = None
    adapter_dir: str
    base_model: str
    base_model_digest: str
    template: str
    instruction: str
    label_names: list[str]
    dataset_hash: str | None = None
    steps: int  # optimizer steps done
    total_steps: int  # optimizer steps planned (steps < total_steps after early stopping)
    metrics: TrainMetrics
    history: list[EvalPoint] = []
    resumed_from_step: int | None = None  # the checkpoint's step this session continued from
    backend: Literal["peft", "torchtune"]
