from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from core.paths import SpecPath

# A spec value that starts like a filesystem path (not a hub id, not a preset name) names a local file or folder.
LOCAL_PATH_PREFIXES = (".", "/", "~")


def is_local_path(value: object) -> bool:
    """Whether a spec value names a local file or folder by its spelling (`./x`, `/x`, `~/x`)."""
    return isinstance(value, str) and value.startswith(LOCAL_PATH_PREFIXES)


def model_paths(field: str, value: str | None) -> list[SpecPath]:
    """A model or tokenizer reference as the path policy sees it: a local folder when spelled as a path (or
    when it names one here), a hub id when shaped `owner/name`, nothing for a preset name."""
    if not value:
        return []
    if is_local_path(value) or "/" not in value and Path(value).exists():
        return [SpecPath(field, value, kind="model")]
    if "/" in value or "\\" in value:
        return [SpecPath(field, value, kind="model", hub=True)]
    return []


class Spec(BaseModel):
    """Base of every job spec: unknown fields are errors, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    def paths(self) -> list[SpecPath]:
        """The local files and folders this job reads, each with its field: the API refuses a submission whose
        paths lie outside the allowed data folders (api/data_roots.py). None unless a spec says otherwise."""
        return []
