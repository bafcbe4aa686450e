"""Request and response bodies of the HTTP API."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any, Literal, get_args

from fastapi import Path as PathParam, Query
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from core.specs import SPECS

# The kinds of job there are: one per spec model in core.specs.SPECS, the one list of them.
JobKind = Literal[tuple(SPECS)]  # type: ignore[valid-type]
# A job's life: queued -> running -> one of the last three (db.models.JOB_STATUSES).
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
# Row ids are INTEGER columns: 32-bit on PostgreSQL (64 on SQLite), so a bigger id is refused (422), never
# sent to the store (an overflow there was a 500). Offsets are 64-bit on both (SQLite, PostgreSQL BIGINT).
MAX_ID = 2**31 - 1
MAX_OFFSET = 2**63 - 1
# An idempotency key: printable text (the same rule as the `Idempotency-Key` header), at most the column's width.
IDEMPOTENCY_KEY_PATTERN = r"^[^\x00-\x1f\x7f]+$"

# A row id in a path and an offset in a query, bounded by what the store can hold: beyond, a 422, not a 500.
RowId = Annotated[int, PathParam(ge=1, le=MAX_ID, description="A row id.")]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="How many rows to skip.")]


def _known_kind(kind: Any) -> Any:
    """Refuse an unknown kind with the list of known ones (the enum's own message lists them less plainly)."""
    if isinstance(kind, str) and kind not in get_args(JobKind):
        raise ValueError(f"unknown job kind: use one of {', '.join(get_args(JobKind))}")
    return kind


def _as_utc(t: datetime) -> datetime:
    """The store keeps naive UTC (db.models.utcnow): say so, so every time is RFC 3339 with its offset."""
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


UtcTime = Annotated[datetime, AfterValidator(_as_utc)]


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Annotated[JobKind, BeforeValidator(_known_kind)] = Field(
        description="Which job to run; `spec` is validated against that kind's spec.")
    spec: dict[str, Any] = Field(default_factory=dict,
                                 description="The kind's settings; a bad one is answered 422 naming each field.")
    idempotency_key: str | None = Field(
        default=None, min_length=1, max_length=200, pattern=IDEMPOTENCY_KEY_PATTERN,
        description="Same as the `Idempotency-Key` header: a key reused with the same submission returns the "
                    "first job (200); with a different one, 409.")
    parent_id: int | None = Field(default=None, ge=1, le=MAX_ID)

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        """The body's schema says which spec each kind takes, unknown fields refused as the server refuses them:
        `oneOf` one variant per kind, its `spec` that kind's spec model.

        Only the schema says so: the server validates `spec` itself (`create_job`), so a bad spec's 422 names
        the field by its path within the spec, and an unknown kind's lists the known ones.
        """
        body = handler.resolve_ref_schema(handler(core_schema))
        body["properties"]["spec"].pop("additionalProperties", None)  # each variant's spec model says which
        body["oneOf"] = [
            {**body, "title": f"JobCreate ({kind})",
             "properties": {**body["properties"], "kind": {"type": "string", "const": kind},
                            "spec": handler(model.__pydantic_core_schema__)}}
            for kind, model in SPECS.items()]
        return body


class ErrorOut(BaseModel):
    """The body of every error but 422: what went wrong, in one sentence."""
    detail: str


class FieldError(BaseModel):
    loc: list[str | int] = Field(description="Where: e.g. [\"body\", \"spec\"], or a spec field's path.")
    msg: str
    type: str


class ValidationErrorOut(BaseModel):
    """The body of every 422: one entry per bad field (never the input itself)."""
    detail: list[FieldError]


# What each error status means here; every route documents the ones it can answer (see `errors`).
ERROR_MEANINGS: dict[int, str] = {
    400: "The body is not JSON (or not UTF-8).",
    401: "Missing or wrong `Authorization: Bearer` token (required when the API listens beyond loopback).",
    403: "Not allowed: a path outside the allowed folders (NEWSLORA_DATA_ROOTS, NEWSLORA_MODEL_ROOTS), a judge "
         "endpoint or key variable outside its allow-list, an admin-only route, a cross-site request or a "
         "Host not in NEWSLORA_ALLOWED_HOSTS.",
    404: "No row with that id (or not the caller's own).",
    409: "The request conflicts with the row's state (or with an earlier use of the idempotency key).",
    413: "The request body is over NEWSLORA_MAX_BODY_BYTES.",
    422: "A parameter or field is invalid: one entry per problem, naming where and what.",
    503: "The database (or, at submission, the broker) is unavailable; nothing was written, try again shortly.",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route: each error status it can answer, with its body model."""
    return {code: {"model": ValidationErrorOut if code == 422 else ErrorOut, "description": ERROR_MEANINGS[code]}
            for code in codes}


ROW_ERRORS = errors(404, 422, 503)  # a route that reads one row by its id


class JobSummary(BaseModel):
    """A job as `GET /jobs` lists it: everything but its spec."""
    model_config = ConfigDict(from_attributes=True)
    id: int
    kind: JobKind
    queue: str
    status: JobStatus
    result: dict[str, Any] | None
    progress: float
    progress_info: dict[str, Any] | None
    error: str | None
    parent_id: int | None
    idempotency_key: str | None
    cancel_requested: bool
    attempts: int
    code_version: str | None
    created_at: UtcTime
    started_at: UtcTime | None
    finished_at: UtcTime | None
    children: list[int] = Field(default_factory=list)


class JobOut(JobSummary):
    """A job whole: its summary and the resolved spec it runs with."""
    spec: dict[str, Any]


class JobList(BaseModel):
    items: list[JobOut]
    total: int
    limit: int
    offset: int


class JobSummaryList(BaseModel):
    items: list[JobSummary]
    total: int
    limit: int
    offset: int


class EventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    job_id: int
    time: UtcTime
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
    created_at: UtcTime


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
    created_at: UtcTime


class EvaluationOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    job_id: int | None
    name: str
    spec: dict[str, Any]
    document: dict[str, Any]
    report_path: str | None
    created_at: UtcTime


class EvaluationList(BaseModel):
    items: list[EvaluationOut]
    total: int
