"""What the /v1 completions and batches share: a model name resolved to a base and an adapter, a request
turned into a classify job's spec, and the job submitted (commit, then enqueue) or waited for.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy.orm import Session

from api.deps import Caller
from api.routers.openai.errors import OpenAIError
from api.routers.openai.naming import adapter_id_from_model, base_name, fine_tuned_model_name
from broker.app import enqueue, enqueue_advance
from core.contracts.adapter import AdapterMeta
from core.contracts.base import ContractError
from core.openai_shapes import ClassifyRequest
from core.specs import QUEUES
from core.specs.classify import ClassifySpec
from core.version import code_version
from db import jobs as jobq
from db import results as resq
from db.models import TERMINAL, Job, ModelArtifact
from workers.modeling.registry import model_presets

log = logging.getLogger("newslora.api")


@dataclass(frozen=True)
class ServedModel:
    """A /v1 model name as newslora runs it: the base model reference, the adapter (if a fine-tune), and the
    labels the adapter was trained for (None: a base, or an adapter whose newslora.json is unreadable here)."""

    name: str
    model_ref: str
    adapter_id: int | None = None
    labels: list[str] | None = None
    parent: str | None = None
    owner_id: int | None = None
    created: int = 0


def epoch(dt) -> int | None:
    """A stored naive-UTC datetime as Unix seconds."""
    from datetime import timezone
    return None if dt is None else int(dt.replace(tzinfo=timezone.utc).timestamp())


def adapter_labels(art: ModelArtifact) -> list[str] | None:
    try:
        return list(AdapterMeta.load(Path(art.path)).label_names) or None
    except (ContractError, OSError):
        return None


def served_adapter(art: ModelArtifact, session: Session) -> ServedModel:
    return ServedModel(name=fine_tuned_model_name(art), model_ref=art.base_model, adapter_id=art.id,
                       labels=adapter_labels(art), parent=base_name(art.base_model),
                       owner_id=resq.owner_of_job(art.job_id, session=session), created=epoch(art.created_at) or 0)


def base_models() -> list[ServedModel]:
    from workers.modeling.registry import MODEL_PRESETS_DIR
    out = []
    for name in sorted(model_presets()):
        f = MODEL_PRESETS_DIR / f"{name}.yaml"
        out.append(ServedModel(name=name, model_ref=name, created=int(f.stat().st_mtime) if f.exists() else 0))
    return out


def resolve_model(name: str, session: Session, caller: Caller, *, param: str = "model") -> ServedModel:
    """The model a request names: a base preset, or a fine-tune (`ft:...:<adapter id>`) the caller may see.

    Raises:
        OpenAIError: 404 (code model_not_found) for any other name.
    """
    adapter_id = adapter_id_from_model(name)
    if adapter_id is not None:
        art = resq.get_artifact(adapter_id, session=session, owner_id=caller.owner_filter)
        if art is not None and art.kind == "adapter":
            return served_adapter(art, session)
    else:
        for m in base_models():
            if m.name == name:
                return m
    raise OpenAIError(404, f"The model `{name}` does not exist or you do not have access to it: list them with "
                           f"GET /v1/models", param=param, code="model_not_found")


def classify_spec(req: ClassifyRequest, model: ServedModel, *, items: list[dict] | None = None,
                  input_file: str | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The classify job's spec answering `req` with `model`: score mode over the request's choices (or the
    adapter's labels); generate mode when there are none (a base model asked a free-form question).

    Raises:
        OpenAIError: 400 when the choices are not the labels the fine-tune was trained for.
    """
    labels: list[str] | None = None
    mode = "score"
    if req.choices and model.labels:
        if set(req.choices) != set(model.labels):
            raise OpenAIError(400, f"{model.name} was trained for the labels {model.labels}: guided_choice must "
                                   f"name those (in any order) or be left out", param="guided_choice",
                              code="invalid_choices")
    elif req.choices:
        labels = list(req.choices)
    elif not model.labels:
        mode = "generate"
    spec = {"model": model.model_ref, "adapter_id": model.adapter_id, "label_names": labels,
            "instruction": req.instruction, "mode": mode, "items": items, "input_file": input_file,
            **(extra or {})}
    return ClassifySpec.model_validate(spec).model_dump(mode="json")


def generation_options(body: dict[str, Any]) -> dict[str, Any]:
    """Generate-mode settings a request may carry (max_tokens, temperature, top_p, seed)."""
    out: dict[str, Any] = {}
    most = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(most, int) and not isinstance(most, bool) and 1 <= most <= 1024:
        out["max_new_tokens"] = most
    t = body.get("temperature")
    if isinstance(t, (int, float)) and not isinstance(t, bool) and t >= 0:
        out["temperature"] = float(t)
    p = body.get("top_p")
    if isinstance(p, (int, float)) and not isinstance(p, bool) and 0 < p <= 1:
        out["top_p"] = float(p)
    seed = body.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool):
        out["seed"] = seed
    return out


def submit_classify(spec: dict[str, Any], session: Session, caller: Caller) -> Job:
    """Create the classify job, commit, then enqueue it (503, and no job, when the broker is down)."""
    job = jobq.create_job(session=session, kind="classify", queue=QUEUES["classify"], spec=spec,
                          code_version=code_version(), owner_id=caller.user_id)
    session.commit()
    try:
        enqueue(job.id, "classify", QUEUES["classify"])
    except (BrokerError, OSError) as e:
        session.delete(job)
        session.commit()
        log.warning("broker unavailable at submission: %s", type(e).__name__)
        raise OpenAIError(503, "the broker is unavailable; nothing was created, try again shortly",
                          headers={"Retry-After": "2"}) from None
    return job


def cancel_job(job_id: int, session: Session) -> None:
    """Ask a classify job (and its shards) to stop; nothing when it has already ended."""
    try:
        jobq.request_cancel(job_id, session=session)
    except (jobq.JobStateConflict, jobq.JobNotFound):
        return
    session.commit()
    if jobq.children(job_id, session=session):
        try:
            enqueue_advance(job_id)
        except Exception:  # noqa: BLE001 - the reaper advances it within two leases anyway
            log.warning("cancel of job %s: could not enqueue its advance; the reaper will", job_id)


def wait_job(job_id: int, session: Session, *, timeout_s: float) -> Job | None:
    """Poll the store until the job ends: the job, or None after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while True:
        session.rollback()  # end the read transaction: SQLite would keep showing its first snapshot
        session.expire_all()  # and read the row again (expire_on_commit is off: get() would answer from memory)
        job = jobq.get_job(job_id, session=session)
        if job.status in TERMINAL:
            return job
        if time.monotonic() >= deadline:
            return None
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 1.5, 0.25)
