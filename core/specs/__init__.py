"""Job specs: one validated pydantic model per kind of job, JSON round-trip, stored with the job.

Light on purpose (no torch): the API validates submissions with these before anything is enqueued.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from core.specs.base import Spec
from core.specs.classify import ClassifySpec, ClassifyItem
from core.specs.evaluate import EvaluateSpec
from core.specs.export import ExportSpec
from core.specs.judge import JudgeSpec
from core.specs.noop import NoopSpec
from core.specs.pipeline import PipelineSpec
from core.specs.prep import PrepSpec, SourceSpec
from core.specs.train import LoraSpec, TrainSpec

SPECS: dict[str, type[Spec]] = {
    "noop": NoopSpec,
    "prep": PrepSpec,
    "train": TrainSpec,
    "classify": ClassifySpec,
    "judge": JudgeSpec,
    "evaluate": EvaluateSpec,
    "pipeline": PipelineSpec,
    "export": ExportSpec,
}

# Which queue runs each kind: cpu for data prep, judging and metrics; gpu for training and inference.
QUEUES: dict[str, str] = {
    "noop": "cpu",
    "prep": "cpu",
    "judge": "cpu",
    "evaluate": "cpu",
    "pipeline": "cpu",
    "export": "cpu",  # merging and writing files; the check's classification is short
    "train": "gpu",
    "classify": "gpu",
}


class UnknownKind(ValueError):
    pass


def spec_hash(spec: dict[str, Any]) -> str:
    """A stable hash of a spec's JSON: the same spec reuses what it produced (dataset, adapter)."""
    import hashlib
    import json
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:32]


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
           "JudgeSpec", "EvaluateSpec", "PipelineSpec", "ExportSpec"]
