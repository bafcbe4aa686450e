"""The isolated torchtune environment: where its python is, and the environment the recipe runs with.

torchtune 0.6.1 (its last release) needs torchao <= 0.13, which PEFT 0.21 refuses, so torchtune lives in
its own virtual environment (`bash scripts/setup_torchtune_env.sh` -> `.venv-torchtune`).
"""
from __future__ import annotations

import os
from pathlib import Path

from core.settings import child_environment, get_settings

REPO = Path(__file__).resolve().parents[3]
DEFAULT_VENV = REPO / ".venv-torchtune"
TORCHTUNE_VERSION = "0.6.1"


class TorchtuneEnvMissing(RuntimeError):
    """The isolated torchtune environment is not there."""


def torchtune_python() -> Path:
    """The isolated environment's python.

    Looked up in order: $NEWSLORA_TORCHTUNE_PYTHON (a python executable), $NEWSLORA_TORCHTUNE_VENV
    (a venv folder), the repo's `.venv-torchtune` (Settings.torchtune_python / torchtune_venv).

    Raises:
        TorchtuneEnvMissing: none is there, with the command that creates it.
    """
    settings = get_settings()
    if settings.torchtune_python is not None:
        path = settings.torchtune_python.expanduser()
        where = f"NEWSLORA_TORCHTUNE_PYTHON={settings.torchtune_python}"
    else:
        venv = (settings.torchtune_venv or DEFAULT_VENV).expanduser()
        path = venv / "bin" / "python"
        where = str(venv)
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise TorchtuneEnvMissing(
            f"the torchtune backend needs its isolated environment, and there is none at {where}: run "
            f"`bash scripts/setup_torchtune_env.sh` (it creates {DEFAULT_VENV}; set NEWSLORA_TORCHTUNE_VENV or "
            f"NEWSLORA_TORCHTUNE_PYTHON to use another), or train with backend 'peft'")
    return path


def recipe_environment() -> dict[str, str]:
    """The recipe subprocess's environment: this process's, without what would point the isolated python
    at the main venv, unbuffered, without progress bars, and W&B in Settings.wandb_mode (offline unless
    WANDB_MODE says otherwise, as the PEFT loop)."""
    return child_environment(drop=("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"), PYTHONUNBUFFERED="1",
                             TQDM_DISABLE="1", WANDB_MODE=get_settings().wandb_mode)
