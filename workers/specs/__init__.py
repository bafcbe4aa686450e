"""Job specs: one validated pydantic model per kind of job, JSON round-trip, stored with the job.

Light on purpose (no torch): the API validates submissions with these before anything is enqueued.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from workers.specs.base import Spec
from workers.specs.classify import ClassifySpec, ClassifyItem
from workers.specs.evaluate import EvaluateSpec
from workers.specs.judge import JudgeSpec
from workers.specs.noop import NoopSpec
from workers.specs.pipeline import PipelineSpec
from workers.specs.prep import PrepSpec, SourceSpec
from workers.specs.train import LoraSpec, TrainSpec

SPECS: dict[str, type[Spec]] = {
    "noop": NoopSpec,
    "prep": PrepSpec,
    "train": TrainSpec,
    "classify": ClassifySpec,
    "judge": JudgeSpec,
    "evaluate": EvaluateSpec,
    "pipeline": PipelineSpec,
}

# Which queue runs each kind: cpu for data prep, judging and metrics; gpu for training and inference.
QUEUES: dict[str, str] = {
    "noop": "cpu",
    "prep": "cpu",
    "judge": "cpu",
    "evaluate": "cpu",
    "pipeline": "cpu",
    "train": "gpu",
    "classify": "gpu",
}


class UnknownKind(ValueError):
    pass


def parse_spec(kind: str, spec: dict[str, Any] | None) -> Spec:
    """Validate a spec dict for a kind.

    Raises:
        UnknownKind: the kind is not one of SPECS.
        pydantic.ValidationError: the spec is malformed (wrong types, unknown fields, bad values).
    """
    if kind not in SPECS:
        raise UnknownKind(f"unknown job kind {kind!r}: use one of {', '.join(SPECS)}")
    return SPECS[kind].model_validate(spec or {})


__all__ = ["SPECS", "QUEUES", "Spec", "parse_spec", "UnknownKind", "ValidationError", "BaseModel",
           "NoopSpec", "PrepSpec", "SourceSpec", "TrainSpec", "LoraSpec", "ClassifySpec", "ClassifyItem",
           "JudgeSpec", "EvaluateSpec", "PipelineSpec"]
