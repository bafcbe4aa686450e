"""Training checkpoints: adapter weights + optimizer + scheduler + RNG states + position, written atomically.

Layout under a run's out_dir:
    checkpoints/step_000050/adapter_model.safetensors, adapter_config.json   (a loadable PEFT adapter)
    checkpoints/step_000050/trainer_state.pt   (optimizer, scheduler, RNG, step, data position, history)
    checkpoints/step_000050/spec.json          (the resolved spec and code version)
Each is written to a temp folder and renamed into place, so a crash never leaves a half-written one.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from core.atomic import atomic_dir

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.pt"
KEEP_LAST = 2


class IncompatibleCheckpoint(ValueError):
    """A checkpoint in out_dir was made by a different training setup."""


def rng_states() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint folder in out_dir, or None."""
    root = Path(out_dir) / CHECKPOINTS
    done = sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file()) if root.is_dir() else []
    return done[-1] if done else None


def save_checkpoint(out_dir: Path, step: int, *, model: Any, state: dict[str, Any], spec_json: dict[str, Any]) -> Path:
    """Write checkpoints/step_{step} atomically and drop all but the newest KEEP_LAST.

    Args:
        model: the PEFT model (its adapter is saved with `save_pretrained`).
        state: optimizer/scheduler state dicts, RNG states, step, data position, history, ...
    """
    root = Path(out_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp)
        torch.save(state, tmp / STATE_FILE)
        (tmp / "spec.json").write_text(json.dumps(spec_json, indent=2, default=str))
    for old in sorted(p for p in root.glob("step_*") if p != final)[:-(KEEP_LAST - 1) or None]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: Any) -> dict[str, Any]:
    """Load the adapter weights of a checkpoint into `model` and return its trainer state."""
    from peft.utils import set_peft_model_state_dict  # lazy: peft takes seconds to import (see peft_loop)

    weights = load_file(str(Path(path) / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise IncompatibleCheckpoint(f"checkpoint {path} holds weights this model has no place for "
                                     f"({unexpected[:3]} ...): train into a fresh out_dir")
    return torch.load(Path(path) / STATE_FILE, weights_only=False)


def check_compatible(saved_fingerprint: dict[str, Any], fingerprint: dict[str, Any], path: Path) -> None:
    """Raise IncompatibleCheckpoint where the checkpoint was trained with other settings that matter."""
    diff = {k: (saved_fingerprint.get(k), v) for k, v in fingerprint.items() if saved_fingerprint.get(k) != v}
    if diff:
        shown = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise IncompatibleCheckpoint(f"cannot resume from {path}: {shown}. Use the same settings, or train "
                                     f"into a fresh out_dir")
