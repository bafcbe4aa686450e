"""The OpenAI names of newslora's models: a base is its preset name, a fine-tune (an adapter artifact) is
`ft:<base>:newslora:<suffix>:<adapter id>` (OpenAI's `ft:BASE:ORG:SUFFIX:ID`; the suffix may be empty).

The one place that builds or parses these names: `/v1/models`, batches, completions and fine-tuning jobs
all call it. Only the last field (the adapter's artifact id) identifies the adapter; the rest is for people.
"""
from __future__ import annotations

import re
from pathlib import PurePath
from typing import Any, Protocol

FT_PREFIX = "ft:"
ORG = "newslora"
MAX_SUFFIX = 64
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class AdapterLike(Protocol):
    """What naming reads of an adapter artifact (db.models.ModelArtifact has these)."""

    id: int
    base_model: str
    spec: dict[str, Any]


def base_name(base_model: str) -> str:
    """A base model's short name: a preset name as it is, a local checkpoint folder by its folder's name."""
    name = PurePath(base_model).name if ("/" in base_model or "\\" in base_model) else base_model
    return _UNSAFE.sub("-", name).strip("-") or "model"


def clean_suffix(suffix: str | None) -> str:
    """A suffix safe inside a model name: no colons or spaces, at most 64 characters ('' for none)."""
    return _UNSAFE.sub("-", suffix or "").strip("-")[:MAX_SUFFIX]


def suffix_of(adapter: AdapterLike) -> str | None:
    """The suffix stored with an adapter (its spec's `suffix`, set by a fine-tuning job), or None."""
    spec = adapter.spec or {}
    value = spec.get("suffix") or (spec.get("openai") or {}).get("suffix")
    return value if isinstance(value, str) else None


def fine_tuned_model_name(adapter: AdapterLike, suffix: str | None = None) -> str:
    """`ft:<base>:newslora:<suffix>:<adapter id>` for an adapter artifact (`suffix` overrides the stored one)."""
    return (f"{FT_PREFIX}{base_name(adapter.base_model)}:{ORG}:"
            f"{clean_suffix(suffix if suffix is not None else suffix_of(adapter))}:{adapter.id}")


def adapter_id_from_model(name: str) -> int | None:
    """The adapter artifact id a fine-tuned model name ends with, or None when `name` is not one."""
    if not name.startswith(FT_PREFIX):
        return None
    parts = name.split(":")
    if len(parts) != 5 or not parts[4].isdigit() or parts[4].startswith("0"):
        return None
    return int(parts[4])
