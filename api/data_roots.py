"""The one policy over the local paths a submitted job would read: they must lie under the allowed data folders.

Each spec says which paths it reads (`Spec.paths()` in core/specs); the API applies this policy to that list.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import HTTPException

from api.deps import is_loopback
from core.settings import get_settings
from core.specs import Spec


def path_allowed(path: str) -> bool:
    """Whether `path` (after `~` and symlinks) lies under NEWSLORA_HOME or one of NEWSLORA_DATA_ROOTS.

    Without data roots, on loopback, every path is allowed: a local user may read any file they can.
    """
    s = get_settings()
    if not s.data_roots and is_loopback(s.api_host):
        return True
    roots = [s.home, *s.data_roots]
    try:
        p = Path(path).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):  # ValueError: a NUL byte in the path
        return False
    return any(p == r.resolve() or r.resolve() in p.parents for r in roots)


def refuse_paths_outside_data_roots(spec: Spec) -> None:
    """Raises HTTPException 403 naming the first path of `spec` outside the allowed data folders."""
    for p in spec.paths():
        if not path_allowed(p.value):
            raise HTTPException(403, f"path {p.value!r} is outside the allowed data folders (NEWSLORA_DATA_ROOTS)")
