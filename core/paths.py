"""One path policy for every spec field that names a file, folder or model.

A spec declares the paths it reads (`SpecPath`: the field, the value, what kind of thing it names); the API
applies `check_spec_paths` to that list before a job is stored. The rules:

- `hub` values (a Hugging Face hub id) are accepted only as hub ids: `owner/name` with no `..`, no leading
  `/`, `.` or `~`, and nothing at that relative path on the server's disk (a local path is never "hub").
- anything else is resolved (symlinks and `..`, through `os.path.realpath`) and must lie under one of the
  roots of its kind: data under `NEWSLORA_DATA_ROOTS` (and the artifact home), models under
  `NEWSLORA_MODEL_ROOTS` (and the artifact home). A symlink that points out of a root is outside it.
- In single-user mode (the API listens on loopback only and no token is configured) every path the user
  can read is allowed: it is their own machine.

A refusal (`PathRefused`, answered 403) names the field and the rule, never what the file holds, and says
the same whether the path exists or not (no probing the server's disk).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

PathKind = Literal["data", "model"]

# A hub id: owner/name (and an optional revision-free subfolder is not allowed); names of letters, digits,
# '-', '_' and '.', not starting with '.'.
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


class PathRefused(PermissionError):
    """A spec names a path the policy does not allow: the message names the field and the rule."""

    def __init__(self, field: str, rule: str):
        self.field, self.rule = field, rule
        super().__init__(f"{field}: {rule}")


@dataclass(frozen=True)
class SpecPath:
    """One path a spec reads: where it is in the spec, its value, and what it names."""
    field: str  # dotted location in the spec, e.g. "train.path", "prep.test.classes_file"
    value: str
    kind: PathKind = "data"
    hub: bool = False  # the spec says this is a hub id, not a local path


def is_hub_id(value: str) -> bool:
    """Shaped like a hub id and not a path on this machine (relative to the working folder)."""
    return bool(HUB_ID.match(value)) and ".." not in value and not Path(value).exists()


def resolve(value: str) -> Path:
    """The real path a value names (user folder expanded, symlinks and `..` resolved)."""
    if "\x00" in value:
        raise ValueError("a NUL byte in a path")
    return Path(os.path.realpath(Path(value).expanduser()))


def under(path: Path, roots: Iterable[Path]) -> bool:
    """`path` (already resolved) is one of `roots` or lies below one (each root resolved too)."""
    for r in roots:
        rr = Path(os.path.realpath(Path(r).expanduser()))
        if path == rr or rr in path.parents:
            return True
    return False


@dataclass(frozen=True)
class PathPolicy:
    """The roots a caller may read, by kind; `open_access` is the single-user loopback mode."""
    data_roots: tuple[Path, ...]
    model_roots: tuple[Path, ...]
    open_access: bool = False

    def check(self, p: SpecPath) -> None:
        """Raise PathRefused unless `p` is allowed."""
        if p.hub:
            if not is_hub_id(p.value):
                raise PathRefused(p.field, "format 'hub' takes a hub id (owner/name), not a path on the server; "
                                           "upload the file (POST /files) and name its file id instead")
            return
        if self.open_access:
            return
        try:
            real = resolve(p.value)
        except (OSError, RuntimeError, ValueError):
            raise PathRefused(p.field, "not a usable path") from None
        roots = self.data_roots if p.kind == "data" else self.model_roots
        if not under(real, roots):
            env = "NEWSLORA_DATA_ROOTS" if p.kind == "data" else "NEWSLORA_MODEL_ROOTS"
            raise PathRefused(p.field, f"the path is outside the allowed {p.kind} folders ({env} and the "
                                       f"server's home); upload the file (POST /files) and name its file id instead")

    def check_all(self, paths: Iterable[SpecPath]) -> None:
        for p in paths:
            self.check(p)
