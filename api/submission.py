"""What a submitted spec may name, checked before the job is stored (`POST /jobs`).

- bounds: items carried in the body (NEWSLORA_MAX_INLINE_ITEMS), the length of every text in the spec;
- uploads: a data field may name a file id (`file-<24 hex>`, `POST /files`); it is resolved to the stored
  file (the caller's own, 404 otherwise) before the spec is stored;
- paths: every other path goes through the one path policy (api/data_roots.py);
- references: the datasets, adapters and jobs a spec names must be the caller's own (404 otherwise);
- outbound: a judge's endpoint (`base_url`, Ollama `host`) only from NEWSLORA_JUDGE_URLS, its key variable
  (`api_key_env`) only from NEWSLORA_JUDGE_KEY_ENVS and never the API's own token.
"""
from __future__ import annotations

from typing import Any

from fastapi import HTTPException
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.data_roots import refuse_disallowed_paths
from api.deps import Caller
from core import filestore
from core.settings import get_settings
from core.specs import Spec
from db import files as fileq
from db import results as resq
from db.models import Job

# The longest string a spec may hold anywhere (names, instructions, labels, ids...), and an item's text.
MAX_SPEC_TEXT = 10_000
MAX_ITEM_TEXT = 100_000
NEVER_A_JUDGE_KEY = "NEWSLORA_API_TOKEN"


def _invalid(loc: list[Any], msg: str) -> HTTPException:
    return HTTPException(422, [{"loc": loc, "msg": msg, "type": "value_error"}])


def refuse_oversized(kind: str, spec: dict[str, Any]) -> None:
    """422 before the spec is parsed: too many inline items, or a text longer than its bound (the input is
    never echoed)."""
    limit = get_settings().max_inline_items
    items = spec.get("items") if kind == "classify" else None
    if isinstance(items, list) and len(items) > limit:
        raise _invalid(["items"], f"{len(items)} items in the body is over NEWSLORA_MAX_INLINE_ITEMS ({limit}): "
                                  f"upload them as a JSONL or CSV file (POST /files) and give its id as input_file")

    def walk(value: Any, loc: list[Any]) -> None:
        if isinstance(value, str):
            bound = MAX_ITEM_TEXT if len(loc) == 3 and loc[0] == "items" and loc[2] == "text" else MAX_SPEC_TEXT
            if len(value) > bound:
                raise _invalid(loc, f"longer than {bound:,} characters")
        elif isinstance(value, dict):
            for k, v in value.items():
                if isinstance(k, str) and len(k) > MAX_SPEC_TEXT:
                    raise _invalid(loc, f"a key longer than {MAX_SPEC_TEXT:,} characters")
                walk(v, [*loc, k])
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, [*loc, i])
    walk(spec, [])


def _set_field(spec: Spec, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    target: Any = spec
    for name in parents:
        target = getattr(target, name)
    setattr(target, last, value)


def resolve_file_ids(spec: Spec, caller: Caller, session: Session) -> None:
    """Replace each file id among the spec's data paths with its stored file's path (404 unless the
    caller's own, or any for an admin). The file keeps its name's extension, so its format is told by it."""
    for p in spec.paths():
        if p.kind != "data" or p.hub or not fileq.is_file_id(p.value):
            continue
        f = fileq.get_file(p.value, session=session, owner_id=caller.owner_filter)
        if f is None:
            raise HTTPException(404, f"{p.field}: no file with id {p.value}; upload it with POST /files")
        _set_field(spec, p.field, str(filestore.named_path(f.id, f.filename)))


def _not_yours(what: str, ident: int) -> HTTPException:
    return HTTPException(404, f"no {what} with id {ident}")


def refuse_foreign_references(spec: Spec, caller: Caller, session: Session) -> None:
    """404 when a member's spec names a dataset, adapter or job that is not theirs (or does not exist)."""
    if caller.owner_filter is None:
        return
    owner = caller.owner_filter
    data = spec.model_dump()
    for key in ("dataset_id",):
        if data.get(key) is not None and resq.get_dataset(data[key], session=session, owner_id=owner) is None:
            raise _not_yours("dataset", data[key])
    if data.get("adapter_id") is not None and \
            resq.get_artifact(data["adapter_id"], session=session, owner_id=owner) is None:
        raise _not_yours("model artifact", data["adapter_id"])
    job_ids = [data["classify_job_id"]] if data.get("classify_job_id") is not None else []
    for key in ("classify_job_ids", "generate_job_ids", "judge_job_ids"):
        job_ids += data.get(key) or []
    for job_id in job_ids:
        if session.scalar(select(Job.owner_id).where(Job.id == job_id)) != owner:
            raise _not_yours("job", job_id)


def _norm_url(url: str) -> str:
    return url.strip().rstrip("/").lower()


def refuse_outbound(spec: Spec, prefix: str = "") -> None:
    """403 naming the field and the setting when a judge spec points outside the allow-lists."""
    s = get_settings()
    urls = {_norm_url(u) for u in s.judge_urls}
    for field in ("base_url", "host"):
        value = getattr(spec, field, None)
        if value is not None and _norm_url(value) not in urls:
            raise HTTPException(403, f"{prefix}{field}: this judge endpoint is not in NEWSLORA_JUDGE_URLS (the "
                                     f"endpoints the server's admin allows); use one of those")
    key = getattr(spec, "api_key_env", None)
    if key is not None and (key == NEVER_A_JUDGE_KEY or key not in s.judge_key_envs):
        raise HTTPException(403, f"{prefix}api_key_env: only the variables in NEWSLORA_JUDGE_KEY_ENVS may be named "
                                 f"(never {NEVER_A_JUDGE_KEY})")


def check_submission(kind: str, spec: Spec, caller: Caller, session: Session) -> None:
    """Every rule above but the bounds (checked before parsing): file ids resolved in place, then paths,
    references and outbound endpoints refused with 403/404."""
    resolve_file_ids(spec, caller, session)
    refuse_disallowed_paths(spec, caller)
    refuse_foreign_references(spec, caller, session)
    if kind == "judge":
        refuse_outbound(spec)
    elif kind == "pipeline" and getattr(spec, "judge", None) is not None:
        refuse_outbound(spec.judge, "judge.")
