"""LoRA training: `train_adapter` is the plain function a train job calls (knows nothing of Celery).

    from workers.train import train_adapter
    result = train_adapter(TrainSpec(dataset_id=1), Path("datasets/ag_news"), Path("runs/7"), LocalContext())

The PEFT loop (`workers/train/peft_loop.py`) is the default backend; `spec.backend == "torchtune"` runs
torchtune's LoRA recipe instead (`workers/train/torchtune/`). Both return a `TrainResult`, built with their
adapter's `newslora.json` in `workers/train/result.py`.
"""
from __future__ import annotations

from pathlib import Path

from core.context import JobContext
from core.contracts.train import TrainResult
from core.specs.train import TrainSpec
from workers.train.checkpoint import IncompatibleCheckpoint
from workers.train.data import DatasetNotPrepared
from workers.train.peft_loop import PeftLoraTrainer, TrainingDiverged, TrainOutOfMemory, UnknownTargetModules
from workers.train.result import ADAPTER_META
from workers.train.torchtune import train_torchtune


def train_adapter(spec: TrainSpec, dataset_dir: Path, out_dir: Path, ctx: JobContext) -> TrainResult:
    """Fine-tune a LoRA adapter on a prepared dataset; a second call with the same out_dir resumes.

    Args:
        spec: the training spec (model, LoRA shape, optimisation, cadence of evals and checkpoints).
        dataset_dir: a prepared dataset folder (train/validation .jsonl + meta.json from a prep job).
        out_dir: the run's folder: `adapter/` (the final PEFT adapter + newslora.json), `checkpoints/`,
            `metrics.jsonl`.
        ctx: progress, events and cancellation.

    Returns:
        The `TrainResult`: the adapter folder, the base model and its digest, the prompt and labels it was
        trained with, the dataset's hash, steps, metrics (train_loss, val_loss, val_accuracy, tokens_per_s,
        wall_s, ...), the validations' history and the step it resumed from (None for a fresh run).

    Raises:
        DatasetNotPrepared, workers.modeling.registry.ModelNotFound, UnknownTargetModules, IncompatibleCheckpoint:
            bad input, with what to do.
        TrainingDiverged, TrainOutOfMemory: the run failed at a step, with advice.
        JobCancelled: after saving a checkpoint that a later call resumes from.
    """
    if spec.backend == "torchtune":
        return train_torchtune(spec, dataset_dir, out_dir, ctx)
    trainer = PeftLoraTrainer(spec, Path(dataset_dir), Path(out_dir), ctx)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.cleanup()


__all__ = ["train_adapter", "TrainResult", "PeftLoraTrainer", "ADAPTER_META", "DatasetNotPrepared",
           "UnknownTargetModules", "TrainingDiverged", "TrainOutOfMemory", "IncompatibleCheckpoint"]
