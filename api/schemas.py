"""Request and response bodies of the HTTP API."""
from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str = Field(description="noop, prep, train, classify, judge, evaluate or pipeline")
    spec: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)
    parent_id: int | None = None


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    kind: str
    queue: str
    status: str
    spec: dict[str, Any]
    result: dict[str, Any] | None
    progress: float
    progress_info: dict[str, Any] | None
    error: str | None
    parent_id: int | None
    idempotency_key: str | None
    cancel_requested: bool
    attempts: int
    code_version: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    children: list[int] = Field(default_factory=list)


class JobList(BaseModel):
    items: list[JobOut]
    total: int
    limit: int
    offset: int


class EventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    job_id: int
    time: datetime
    level: str
    message: str
    metrics: dict[str, Any] | None


class PredictionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    item_id: str
    seq: int
    label: str | None
    gold: str | None
    probs: dict[str, Any] | None
    response: str | None
    follows_instruction: bool | None
    latency_ms: float | None
    flags: list[Any] | None
    error: str | None
    model: str | None
    adapter_id: int | None


class PredictionPage(BaseModel):
    items: list[PredictionOut]
    total: int
    limit: int
    offset: int


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    job_id: int | None
    name: str
    path: str
    hash: str
    spec: dict[str, Any]
    meta: dict[str, Any]
    created_at: datetime


class ModelOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    job_id: int | None
    kind: str
    name: str
    base_model: str
    path: str
    hash: str | None
    spec: dict[str, Any]
    dataset_id: int | None
    dataset_hash: str | None
    metrics: dict[str, Any] | None
    code_version: str | None
    created_at: datetime


class EvaluationOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    job_id: int | None
    name: str
    spec: dict[str, Any]
    document: dict[str, Any]
    report_path: str | None
    created_at: datetime


class EvaluationList(BaseModel):
    items: list[EvaluationOut]
    total: int
