"""OpenAI's Fine-tuning API (`/v1/fine_tuning/jobs`): each job a view of one pipeline job, prep -> train.

A job's training file (and validation file) is an upload with purpose `fine-tune`, in the chat format or
the prompt/completion format (workers/data/chat_formats.py). newslora fine-tunes classifiers: each line's
answer is its label, and the answers must be a small set of labels. The files are read at creation, so a
malformed line or answers that are no label set is a 400 naming the line, before any job exists.

Status: `validating_files` while the pipeline prepares the dataset, `queued` until its train job starts,
`running`, then the pipeline's end. Events are the pipeline's and its children's events plus one
`metrics` event per training step (the train job's metrics.jsonl); checkpoints are its validations.
"""
from __future__ import annotations

import json
import logging
import math
import pathlib
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from kombu.exceptions import OperationalError as BrokerError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.data_roots import refuse_disallowed_paths
from api.deps import Caller, CallerDep, SessionDep
from api.routers.openai.errors import OpenAIError, openai_errors
from api.routers.openai.idempotency import IdempotencyKeyHeader, fingerprint, remember, replayed
from api.routers.openai.naming import MAX_SUFFIX, adapter_id_from_model, fine_tuned_model_name
from api.routers.links import link
from api.routers.openai.pages import cursor_page
from broker.app import enqueue, enqueue_advance
from core.contracts.base import ContractError
from core.contracts.metrics import MetricsRow, read_metrics
from core.settings import get_settings
from core.specs import QUEUES, PipelineSpec
from core.specs.base import is_local_path
from core.specs.prep import AG_NEWS_LABELS, SourceSpec
from core.specs.train import TrainSpec
from core.version import code_version
from db import files as fileq
from db import fine_tuning as ftq
from db import idempotency as keyq
from db import jobs as jobq
from db import results as resq
from db.models import TERMINAL, FineTuningJob, Job, JobEvent, StoredFile
from workers.data.chat_formats import NOT_TRAINED, openai_format_of
from workers.data.loaders import PrepError, load_source
from workers.modeling.registry import is_checkpoint_dir, model_presets

log = logging.getLogger("newslora.api")
router = APIRouter(prefix="/v1/fine_tuning", tags=["openai"])

MAX_LABELS = 64  # more distinct answers than this is no classification
MAX_LABEL_CHARS = 100
NOT_BAD_LINES = ("blank_line", NOT_TRAINED)  # lines prep skips without complaint
BASE_LEARNING_RATE = TrainSpec.model_fields["learning_rate"].default  # learning_rate_multiplier 1
AUTO_EPOCHS = 3
MAX_AUTO_BATCH = 16

# ---------------------------------------------------------------- request and response shapes

Auto = Literal["auto"]


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: Auto | Annotated[int, Field(ge=1, le=50)] | None = None
    batch_size: Auto | Annotated[int, Field(ge=1, le=256)] | None = None
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=100)] | None = None


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters | None = None


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised"] = Field(description="newslora trains supervised (LoRA) fine-tunes only")
    supervised: SupervisedMethod | None = None


FileId = Annotated[str, Field(min_length=1, max_length=64)]


class FineTuningJobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=500, description="a model preset, or a local checkpoint folder")
    training_file: FileId
    validation_file: FileId | None = None
    suffix: str | None = Field(default=None, max_length=MAX_SUFFIX)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = None
    hyperparameters: Hyperparameters | None = Field(default=None, description="deprecated: use method")
    method: Method | None = None
    integrations: list[dict[str, Any]] | None = Field(default=None, max_length=0,
                                                      description="not supported: give none")

    @field_validator("metadata")
    @classmethod
    def _at_most_16(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None and len(v) > 16:
            raise ValueError("at most 16 metadata keys")
        return v


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class ResolvedHyperparameters(BaseModel):
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float


class FineTuningJobOut(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    model: str
    organization_id: str
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
    training_file: str
    validation_file: str | None
    hyperparameters: ResolvedHyperparameters
    seed: int
    result_files: list[str]
    fine_tuned_model: str | None
    finished_at: int | None
    trained_tokens: int | None
    error: JobError | None
    estimated_finish: int | None = None
    integrations: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None
    method: dict[str, Any]
    user_provided_suffix: str | None = None


class FineTuningJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobOut]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FineTuningEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    data: dict[str, Any] | None = None
    type: Literal["message", "metrics"] = "message"


class FineTuningEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningEvent]
    first_id: str | None
    last_id: str | None
    has_more: bool


class CheckpointMetrics(BaseModel):
    step: float
    train_loss: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None


class FineTuningCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: CheckpointMetrics


class FineTuningCheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningCheckpoint]
    first_id: str | None
    last_id: str | None
    has_more: bool


FtJobId = Annotated[str, Path(min_length=1, max_length=64, description="a fine-tuning job id (ftjob-...)")]
After = Annotated[str | None, Query(max_length=200, description="the last id of the previous page")]

# ---------------------------------------------------------------- reading the training files


def _epoch(t: datetime | None) -> int | None:
    return int(t.replace(tzinfo=timezone.utc).timestamp()) if t is not None else None


def _fine_tune_file(file_id: str, param: str, caller: Caller, session: Session) -> StoredFile:
    f = fileq.get_file(file_id, session=session, owner_id=caller.owner_filter)
    if f is None:
        raise OpenAIError(400, f"{param} {file_id!r}: no such file; upload it with purpose 'fine-tune' first",
                          param=param, code="invalid_file")
    if f.purpose != "fine-tune":
        raise OpenAIError(400, f"{param} {file_id!r} has purpose {f.purpose!r}; upload it with purpose 'fine-tune'",
                          param=param, code="invalid_file_purpose")
    return f


def _format_of(f: StoredFile, param: str) -> str:
    """`openai_chat` or `prompt_completion`, from the file's first non-blank line."""
    try:
        with open(f.path, "rb") as fh:
            for raw in fh:
                if raw.strip():
                    fmt = openai_format_of(json.loads(raw))
                    if fmt is None:
                        break
                    return fmt
    except (OSError, ValueError):
        pass
    raise OpenAIError(400, f"{param} {f.id}: the first line is neither {{\"messages\": [...]}} (chat format) nor "
                           f"{{\"prompt\", \"completion\"}}: give one JSON object a line in one of those formats",
                      param=param, code="invalid_file_format")


def _read_labels(f: StoredFile, fmt: str, param: str) -> tuple[list[str], int]:
    """The answers (labels) of a fine-tuning file, in first-seen order, and its usable line count.

    Raises:
        OpenAIError: 400 naming the first malformed line (or what is wrong with the whole file).
    """
    try:
        src = load_source(param, SourceSpec(path=f.path, format=fmt), None)
    except PrepError as e:
        raise OpenAIError(400, f"{param} {f.id}: {str(e).replace(f.path, f.filename)}", param=param,
                          code="invalid_file_format") from None
    labels: dict[str, None] = {}
    usable = 0
    for row in src.rows:
        if row.problem in NOT_BAD_LINES:
            continue
        if row.problem:
            raise OpenAIError(400, f"{param} {f.id} ({f.filename}) line {row.row} {row.detail}", param=param,
                              code="invalid_file_format")
        labels.setdefault(row.label, None)
        usable += 1
    return list(labels), usable


def _check_label_set(labels: list[str], rows: int, f: StoredFile) -> list[str]:
    """The labels of a classification fine-tune, in the order its classifier uses (AG News's when they are
    AG News's four; else sorted), or 400: fewer than two, too many, or too many for the lines."""
    many = len(labels) > MAX_LABELS or (rows >= 4 and len(labels) > rows // 2)
    if len(labels) < 2 or many or any(len(x) > MAX_LABEL_CHARS for x in labels):
        why = ("has fewer than two distinct answers" if len(labels) < 2 else
               f"has {len(labels)} distinct answers over {rows} lines" if many else
               f"has an answer over {MAX_LABEL_CHARS} characters")
        raise OpenAIError(400, f"training_file {f.id} ({f.filename}) {why}: newslora fine-tunes classifiers, whose "
                               f"assistant answers (completions) are a small set of labels (2 to {MAX_LABELS}, each "
                               f"seen on two lines or more, e.g. 'World', 'Sports')", param="training_file",
                          code="invalid_label_set")
    return list(AG_NEWS_LABELS) if set(labels) == set(AG_NEWS_LABELS) else sorted(labels)


def _check_model(model: str) -> None:
    if adapter_id_from_model(model) is not None:
        raise OpenAIError(400, f"model {model!r} is a fine-tuned model: fine-tune its base model instead",
                          param="model", code="model_not_available")
    if model in model_presets():
        return
    if is_local_path(model) and is_checkpoint_dir(pathlib.Path(model).expanduser()):
        return
    raise OpenAIError(400, f"model {model!r} is neither a model preset ({', '.join(sorted(model_presets()))}) nor a "
                           f"local checkpoint folder", param="model", code="model_not_available")


def _resolve(given: Hyperparameters, rows: int) -> ResolvedHyperparameters:
    """Numbers for "auto" (or absent): 3 epochs, a batch of a tenth of the lines (1 to 16), multiplier 1."""
    return ResolvedHyperparameters(
        n_epochs=AUTO_EPOCHS if given.n_epochs in (None, "auto") else int(given.n_epochs),
        batch_size=max(1, min(MAX_AUTO_BATCH, math.ceil(rows / 10))) if given.batch_size in (None, "auto")
        else int(given.batch_size),
        learning_rate_multiplier=1.0 if given.learning_rate_multiplier in (None, "auto")
        else float(given.learning_rate_multiplier))


def _pipeline_spec(body: FineTuningJobCreate, train: tuple[StoredFile, str], valid: tuple[StoredFile, str] | None,
                   labels: list[str], hp: ResolvedHyperparameters, rows: int, seed: int) -> PipelineSpec:
    """prep (the uploaded files, as they are) -> train, validating and checkpointing once an epoch."""
    steps_per_epoch = max(1, math.ceil(rows / hp.batch_size))
    total = steps_per_epoch * hp.n_epochs
    prep = {"name": f"ft-{train[0].id}", "train": {"path": train[0].path, "format": train[1]}, "test": None,
            "validation": {"path": valid[0].path, "format": valid[1]} if valid else None,
            "label_names": labels, "validation_fraction": 0.0, "seed": seed}
    return PipelineSpec.model_validate({
        "name": f"fine-tune {body.suffix or train[0].id}", "model": body.model, "prep": prep, "until": "train",
        "judge": None, "generate_limit": 0,
        "train": {"epochs": hp.n_epochs, "batch_size": hp.batch_size, "seed": seed,
                  "learning_rate": BASE_LEARNING_RATE * hp.learning_rate_multiplier,
                  "warmup_steps": min(20, total // 10), "eval_every": steps_per_epoch,
                  "save_every": steps_per_epoch}})


# ---------------------------------------------------------------- the job as OpenAI shows it


class _View:
    """One fine-tuning job's pipeline, its prep and train children, and the adapter it made."""

    def __init__(self, ft: FineTuningJob, session: Session) -> None:
        self.ft = ft
        self.job: Job | None = session.get(Job, ft.job_id) if ft.job_id is not None else None
        self.kids: dict[str, Job] = {}
        if self.job is not None:
            prefix = f"pipeline:{self.job.id}:"
            for c in jobq.children(self.job.id, session=session):
                if (c.idempotency_key or "").startswith(prefix):
                    self.kids[c.idempotency_key[len(prefix):]] = c
        self.stages: dict[str, Any] = ((self.job.result or {}).get("stages") or {}) if self.job else {}
        self.adapter = None
        if self.job is not None and self.job.status == "succeeded":
            adapter_id = (self.job.result or {}).get("adapter_id")
            self.adapter = resq.get_artifact(adapter_id, session=session) if adapter_id else None

    @property
    def status(self) -> str:
        if self.job is None:
            return "failed"
        if self.job.status in TERMINAL:
            return self.job.status
        if "prep" not in self.stages:
            return "validating_files"
        train = self.kids.get("train")
        return "running" if train is not None and train.status == "running" else "queued"

    @property
    def fine_tuned_model(self) -> str | None:
        return fine_tuned_model_name(self.adapter, self.ft.suffix or "") if self.adapter is not None else None

    def tag_adapter(self) -> None:
        """Store the job's suffix with its adapter, so `/v1/models` names it as this job does (naming.py)."""
        if self.adapter is not None and (self.adapter.spec or {}).get("openai", {}).get("suffix") != self.ft.suffix:
            self.adapter.spec = {**(self.adapter.spec or {}),
                                 "openai": {"suffix": self.ft.suffix, "fine_tuning_job": self.ft.id}}

    def error(self) -> JobError | None:
        if self.job is None:
            return JobError(code="job_missing", message="the job behind this fine-tuning job was deleted")
        if self.job.status != "failed":
            return None
        prep = self.kids.get("prep")
        if prep is not None and prep.status == "failed":
            return JobError(code="invalid_training_file", message=prep.error or "data preparation failed",
                            param="training_file")
        return JobError(code="training_failed", message=self.job.error or "training failed")

    def trained_tokens(self) -> int | None:
        train = self.kids.get("train")
        if self.status != "succeeded" or train is None:
            return None
        return ((train.result or {}).get("metrics") or {}).get("tokens")

    def metrics_rows(self) -> list[MetricsRow]:
        train = self.kids.get("train")
        if train is None:
            return []
        try:  # the train job's run folder (workers/jobs/handlers.py `_run_train`)
            return read_metrics(get_settings().home / "adapters" / f"job-{train.id}")
        except ContractError:  # a line being written right now: the next poll reads it
            return []

    def out(self) -> FineTuningJobOut:
        ft = self.ft
        return FineTuningJobOut(
            id=ft.id, created_at=_epoch(ft.created_at), model=ft.model, organization_id="org-newslora",
            status=self.status, training_file=ft.training_file, validation_file=ft.validation_file,
            hyperparameters=ResolvedHyperparameters(**ft.hyperparameters), seed=ft.seed, result_files=[],
            fine_tuned_model=self.fine_tuned_model,
            finished_at=_epoch(self.job.finished_at) if self.job is not None and self.status in TERMINAL else None,
            trained_tokens=self.trained_tokens(), error=self.error(), metadata=ft.job_metadata, method=ft.method,
            user_provided_suffix=ft.suffix)


def _ft_or_404(ft_id: str, caller: Caller, session: Session) -> FineTuningJob:
    ft = ftq.get_fine_tuning_job(ft_id, session=session, owner_id=caller.owner_filter)
    if ft is None:
        raise OpenAIError(404, f"no fine-tuning job {ft_id!r}", param="fine_tuning_job_id", code="not_found")
    return ft


def _view(ft: FineTuningJob, session: Session) -> _View:
    v = _View(ft, session)
    v.tag_adapter()
    return v


# ---------------------------------------------------------------- routes

# Where a fine-tuning job's id leads (OpenAPI links: Schemathesis's stateful phase follows them).
FT_JOB_OPERATIONS = {"job": ("GET", "/v1/fine_tuning/jobs/{fine_tuning_job_id}"),
                     "cancel": ("POST", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel"),
                     "events": ("GET", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events"),
                     "checkpoints": ("GET", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints")}


@router.post("/jobs", response_model=FineTuningJobOut, responses=openai_errors(400, 401, 403, 409, 422, 503),
             openapi_extra=link("200", to=FT_JOB_OPERATIONS, fine_tuning_job_id="$response.body#/id"))
def create_fine_tuning_job(body: FineTuningJobCreate, session: SessionDep, caller: CallerDep,
                           idempotency_key: IdempotencyKeyHeader = None) -> FineTuningJobOut:
    fp = fingerprint(body.model_dump(mode="json"))
    if (first := replayed(idempotency_key, "fine_tuning", fp, caller, session)) is not None:
        return _view(_ft_or_404(first, caller, session), session).out()
    _check_model(body.model)
    train_file = _fine_tune_file(body.training_file, "training_file", caller, session)
    train_fmt = _format_of(train_file, "training_file")
    labels, rows = _read_labels(train_file, train_fmt, "training_file")
    labels = _check_label_set(labels, rows, train_file)
    valid = None
    if body.validation_file:
        vf = _fine_tune_file(body.validation_file, "validation_file", caller, session)
        vfmt = _format_of(vf, "validation_file")
        vlabels, _ = _read_labels(vf, vfmt, "validation_file")
        unknown = [x for x in vlabels if x not in labels]
        if unknown:
            raise OpenAIError(400, f"validation_file {vf.id} has answers the training file never gives "
                                   f"({', '.join(map(repr, unknown[:5]))}): the classifier's labels are the training "
                                   f"file's ({', '.join(labels)})", param="validation_file", code="invalid_label_set")
        valid = (vf, vfmt)
    given = (body.method.supervised.hyperparameters if body.method and body.method.supervised else None) \
        or body.hyperparameters or Hyperparameters()
    hp = _resolve(given, rows)
    seed = body.seed if body.seed is not None else 42
    try:
        spec = _pipeline_spec(body, (train_file, train_fmt), valid, labels, hp, rows, seed)
    except ValidationError as e:
        raise OpenAIError(400, "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}"
                                         for err in e.errors(include_url=False)), code="invalid_hyperparameters")
    refuse_disallowed_paths(spec, caller)
    job = jobq.create_job(session=session, kind="pipeline", queue=QUEUES["pipeline"],
                          spec=spec.model_dump(mode="json"), code_version=code_version(), owner_id=caller.user_id)
    ft = ftq.add_fine_tuning_job(
        session=session, owner_id=caller.user_id, job_id=job.id, model=body.model, training_file=train_file.id,
        validation_file=valid[0].id if valid else None, suffix=body.suffix, seed=seed,
        hyperparameters=hp.model_dump(), job_metadata=body.metadata,
        method={"type": "supervised", "supervised": {"hyperparameters": hp.model_dump()}})
    jobq.add_event(job.id, f"Created fine-tuning job: {ft.id}", session=session)
    try:
        remember(idempotency_key, "fine_tuning", fp, ft.id, caller, session)
        session.commit()
    except IntegrityError:  # a concurrent request with the same key made the job: answer it
        session.rollback()
        first = replayed(idempotency_key, "fine_tuning", fp, caller, session)
        if first is None:
            raise
        return _view(_ft_or_404(first, caller, session), session).out()
    try:  # commit, then enqueue; if the broker is down, take the rows back
        enqueue(job.id, "pipeline", QUEUES["pipeline"])
    except (BrokerError, OSError) as e:
        keyq.forget_object(session=session, scope="fine_tuning", object_id=ft.id)
        session.delete(ft)
        session.delete(job)
        session.commit()
        log.warning("broker unavailable at fine-tuning job creation: %s", type(e).__name__)
        raise OpenAIError(503, "the broker is unavailable; the job was not created, try again shortly",
                          headers={"Retry-After": "2"}) from None
    session.refresh(job)
    return _view(ft, session).out()


def _metadata_filter(request: Request) -> dict[str, str]:
    """`metadata[k]=v` query parameters (the SDK's encoding of `metadata={"k": "v"}`)."""
    out = {}
    for name, value in request.query_params.multi_items():
        if name.startswith("metadata[") and name.endswith("]") and len(name) > len("metadata[]"):
            out[name[len("metadata["):-1]] = value
    return out


@router.get("/jobs", response_model=FineTuningJobList, responses=openai_errors(401, 422, 503),
            openapi_extra=link("200", to=FT_JOB_OPERATIONS, fine_tuning_job_id="$response.body#/data/0/id"))
def list_fine_tuning_jobs(request: Request, session: SessionDep, caller: CallerDep, after: After = None,
                          limit: int = Query(20, ge=1, le=100)) -> FineTuningJobList:
    rows, more = ftq.list_fine_tuning_jobs(session=session, owner_id=caller.owner_filter, after=after, limit=limit,
                                           metadata=_metadata_filter(request))
    page = cursor_page([_view(ft, session).out().model_dump() for ft in rows], has_more=more)
    return FineTuningJobList.model_validate(page)


@router.get("/jobs/{fine_tuning_job_id}", response_model=FineTuningJobOut, responses=openai_errors(401, 404, 422, 503))
def retrieve_fine_tuning_job(fine_tuning_job_id: FtJobId, session: SessionDep, caller: CallerDep) -> FineTuningJobOut:
    return _view(_ft_or_404(fine_tuning_job_id, caller, session), session).out()


@router.post("/jobs/{fine_tuning_job_id}/cancel", response_model=FineTuningJobOut,
             responses=openai_errors(401, 404, 409, 422, 503))
def cancel_fine_tuning_job(fine_tuning_job_id: FtJobId, session: SessionDep, caller: CallerDep) -> FineTuningJobOut:
    ft = _ft_or_404(fine_tuning_job_id, caller, session)
    try:
        if ft.job_id is None:
            raise jobq.JobStateConflict("its job was deleted")
        jobq.request_cancel(ft.job_id, session=session)
    except jobq.JobStateConflict as e:
        raise OpenAIError(409, f"fine-tuning job {ft.id} cannot be cancelled: {e}", code="job_not_cancellable") \
            from None
    session.commit()
    try:  # a pipeline between stages has no task running to see the cancel: advancing it ends it now
        enqueue_advance(ft.job_id)
    except Exception:  # noqa: BLE001 - the reaper advances it within two leases anyway
        log.warning("cancel of fine-tuning job %s: could not enqueue its advance; the reaper will", ft.id)
    return _view(ft, session).out()


LEVELS = {"warning": "warn", "warn": "warn", "error": "error"}


def _is_train_progress(e: JobEvent) -> bool:
    """A train job's progress or validation event: shown as the metrics events of metrics.jsonl instead."""
    m = e.metrics or {}
    return ("done" in m and "total" in m) or "val_loss" in m


def _events(v: _View, session: Session) -> list[FineTuningEvent]:
    """Every event of the job, newest first: messages from the pipeline and its children, and one metrics
    event per training step (with the validation's figures at a validation step)."""
    out: list[tuple[datetime, tuple[int, int], FineTuningEvent]] = []
    sources = ([v.job] if v.job is not None else []) + [v.kids[k] for k in ("prep", "train") if k in v.kids]
    for job in sources:
        for e in jobq.events(job.id, session=session, limit=100_000):
            if job.kind == "train" and _is_train_progress(e):
                continue
            data = {k: val for k, val in (e.metrics or {}).items() if isinstance(val, (str, int, float, bool))}
            message = e.message if job.kind == "pipeline" or e.message.startswith(f"{job.kind}:") \
                else f"{job.kind}: {e.message}"
            out.append((e.time, (0, e.id), FineTuningEvent(
                id=f"ftevent-{e.id}", created_at=_epoch(e.time), level=LEVELS.get(e.level, "info"), message=message,
                data=data or None)))
    train = v.kids.get("train")
    if train is not None:
        start = train.started_at or train.created_at
        total = (train.result or {}).get("total_steps") or (train.progress_info or {}).get("total")
        steps: dict[int, dict[str, Any]] = {}
        for r in v.metrics_rows():
            d = steps.setdefault(r.step, {"step": r.step})
            if r.type == "step":
                d.update(train_loss=r.loss, total_steps=total, train_s=r.train_s)
            else:
                d.update(valid_loss=r.val_loss, valid_mean_token_accuracy=r.val_accuracy)
        for step, d in steps.items():
            at = start + timedelta(seconds=d.get("train_s") or 0)
            data = {k: val for k, val in d.items() if val is not None and k != "train_s"}
            msg = f"Step {step}" + (f"/{total}" if total else "") + (
                f": training loss={d['train_loss']:.4f}" if d.get("train_loss") is not None else "") + (
                f", validation loss={d['valid_loss']:.4f}" if d.get("valid_loss") is not None else "")
            out.append((at, (1, step), FineTuningEvent(id=f"ftevent-{train.id}-step-{step}", created_at=_epoch(at),
                                                    level="info", message=msg, data=data, type="metrics")))
    if v.status == "succeeded" and v.fine_tuned_model:  # the last word: after the pipeline's own last event
        at = max([t for t, _, _ in out] + [v.job.finished_at or v.job.updated_at])
        out.append((at, (2, 0), FineTuningEvent(id=f"ftevent-{v.ft.id[len('ftjob-'):]}-done", created_at=_epoch(at),
                                               level="info", message=f"New fine-tuned model created: "
                                                                     f"{v.fine_tuned_model}")))
    out.sort(key=lambda t: (t[0], t[1]), reverse=True)
    return [e for _, _, e in out]


def _page(items: list[Any], after: str | None, limit: int) -> tuple[list[Any], bool]:
    """The `limit` items after the one whose id is `after` (all of them from the start without it)."""
    start = 0
    if after:
        start = next((i + 1 for i, x in enumerate(items) if x.id == after), len(items))
    page = items[start:start + limit]
    return page, start + limit < len(items)


@router.get("/jobs/{fine_tuning_job_id}/events", response_model=FineTuningEventList,
            responses=openai_errors(401, 404, 422, 503))
def list_fine_tuning_events(fine_tuning_job_id: FtJobId, session: SessionDep, caller: CallerDep, after: After = None,
                            limit: int = Query(20, ge=1, le=1000)) -> FineTuningEventList:
    v = _view(_ft_or_404(fine_tuning_job_id, caller, session), session)
    page, more = _page(_events(v, session), after, limit)
    return FineTuningEventList.model_validate(cursor_page([e.model_dump() for e in page], has_more=more))


@router.get("/jobs/{fine_tuning_job_id}/checkpoints", response_model=FineTuningCheckpointList,
            responses=openai_errors(401, 404, 422, 503))
def list_fine_tuning_checkpoints(fine_tuning_job_id: FtJobId, session: SessionDep, caller: CallerDep,
                                 after: After = None, limit: int = Query(10, ge=1, le=100)
                                 ) -> FineTuningCheckpointList:
    """One checkpoint per validation and per saved step (once an epoch) and the last step, newest first, listed
    once the job has its model (a checkpoint is named after it)."""
    v = _view(_ft_or_404(fine_tuning_job_id, caller, session), session)
    train = v.kids.get("train")
    items: list[FineTuningCheckpoint] = []
    if v.fine_tuned_model is not None and train is not None:
        rows = v.metrics_rows()
        step_rows = {r.step: r for r in rows if r.type == "step"}
        evals = {r.step: r for r in rows if r.type == "eval"}
        save_every = int((train.spec or {}).get("save_every") or 0)
        kept = set(evals) | {s for s in step_rows if save_every and s % save_every == 0} | \
            ({max(step_rows)} if step_rows else set())
        start = train.started_at or train.created_at
        for step in kept:
            ev, st = evals.get(step), step_rows.get(step)
            seconds = (ev.wall_s or ev.train_s) if ev is not None else (st.train_s if st is not None else None)
            at = start + timedelta(seconds=seconds or 0)
            items.append(FineTuningCheckpoint(
                id=f"ftckpt-{train.id}-{step}", created_at=_epoch(at),
                fine_tuned_model_checkpoint=f"{v.fine_tuned_model}:ckpt-step-{step}", fine_tuning_job_id=v.ft.id,
                step_number=step, metrics=CheckpointMetrics(
                    step=step, train_loss=st.loss if st is not None else None,
                    valid_loss=ev.val_loss if ev is not None else None,
                    valid_mean_token_accuracy=ev.val_accuracy if ev is not None else None)))
    items.sort(key=lambda c: c.step_number, reverse=True)
    page, more = _page(items, after, limit)
    return FineTuningCheckpointList.model_validate(cursor_page([c.model_dump() for c in page], has_more=more))
