"""The roots a caller's job may read, and the check of a submitted spec's paths against them (core/paths.py).

Each spec says which paths it reads (`Spec.paths()` in core/specs); `refuse_disallowed_paths` applies the one
path policy (`core.paths.PathPolicy`) to that list: data under NEWSLORA_DATA_ROOTS and the home, models under
NEWSLORA_MODEL_ROOTS, the home and the model presets' own folders. Single-user mode (loopback, no token)
with no roots configured may name any local path: it is the user's own machine. Hub ids are checked as hub
ids in every mode.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import HTTPException

from api.deps import Caller
from core.paths import PathPolicy, PathRefused
from core.settings import get_settings
from core.specs import Spec
from workers.modeling.registry import model_presets


def preset_folders() -> list[Path]:
    """The local folders the model presets load from (a preset's `local_dir`, or $NEWSLORA_<PRESET>_DIR)."""
    s = get_settings()
    out = []
    for p in model_presets().values():
        d = s.preset_dir(p.name) or (Path(p.local_dir).expanduser() if p.local_dir else None)
        if d is not None:
            out.append(d)
    return out


def path_policy(caller: Caller) -> PathPolicy:
    """The policy for `caller`: roots from the settings; open access only in single-user mode without roots."""
    s = get_settings()
    return PathPolicy(data_roots=(s.home, *s.data_roots), model_roots=(s.home, *s.model_roots, *preset_folders()),
                      open_access=caller.single_user and not s.data_roots and not s.model_roots)


def refuse_disallowed_paths(spec: Spec, caller: Caller) -> None:
    """Raises HTTPException 403 naming the first path field of `spec` the policy refuses (and the rule)."""
    try:
        path_policy(caller).check_all(spec.paths())
    except PathRefused as e:
        raise HTTPException(403, str(e)) from None
