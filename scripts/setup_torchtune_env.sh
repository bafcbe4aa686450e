#!/usr/bin/env bash
# Creates the isolated Python environment that the torchtune training backend runs in.
#
#   bash scripts/setup_torchtune_env.sh            # -> .venv-torchtune in the repo (git-ignored)
#   NEWSLORA_TORCHTUNE_VENV=/opt/tt bash scripts/setup_torchtune_env.sh
#
# Why a separate environment: torchtune 0.6.1 (the last release; the project is no longer maintained)
# needs torchao <= 0.13, while PEFT 0.21 in the main venv refuses any torchao older than 0.16 once
# torchao is importable. So the main venv has no torchao and no torchtune, and
# `workers/train/torchtune/` runs torchtune's recipe in a subprocess with this
# environment's python (NEWSLORA_TORCHTUNE_VENV, or NEWSLORA_TORCHTUNE_PYTHON=/path/to/python).
#
# torch is installed FIRST and pinned to the CPU build that lies on this machine's disk: a looser
# pin, or letting torchtune pull torch, downloads a multi-GB CUDA build.
# A second run finds the environment working and returns at once (`make test` calls it every time).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NEWSLORA_TORCHTUNE_VENV:-$REPO/.venv-torchtune}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
TORCH_VERSION="${NEWSLORA_TORCHTUNE_TORCH:-2.13.0}"
# The set that works together (Python 3.11): torch 2.13.0+cpu, torchtune 0.6.1, torchao 0.13.0,
# torchdata 0.11.0 (the recipe's StatefulDataLoader), omegaconf 2.4.0 (its config parser), and wandb
# 0.31.0 for `train.wandb=true` runs (torchtune's WandBLogger; offline unless WANDB_MODE says otherwise;
# about 8 s more to install).
WANDB_VERSION="0.31.0"
PACKAGES=("torch==$TORCH_VERSION" "torchtune==0.6.1" "torchao==0.13.0" "torchdata==0.11.0" "omegaconf==2.4.0"
          "wandb==$WANDB_VERSION")
STAMP="$VENV/.newslora-installed"

check() {
  "$VENV/bin/python" - <<'PY'
import importlib.util, pathlib
import torch, torchao, torchtune, wandb
from torchtune.models.llama3_2 import lora_llama3_2  # noqa: F401
from torchtune.training import FullModelHFCheckpointer  # noqa: F401
from torchtune.training.metric_logging import WandBLogger  # noqa: F401
# The recipes ship in the wheel as plain files (their folder refuses to be imported as a package).
recipes = pathlib.Path(importlib.util.find_spec("torchtune").origin).parents[1] / "recipes"
assert (recipes / "lora_finetune_single_device.py").is_file(), f"recipe missing under {recipes}"
print(f"torchtune env ok: torch {torch.__version__}, torchao {torchao.__version__}, torchtune {torchtune.__version__}, "
      f"wandb {wandb.__version__}")
PY
}

# Fast path: set up before and the pinned versions still there (read from metadata, no torch import).
if [ -f "$STAMP" ] && [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "
import sys
from importlib.metadata import version
want = {'torchtune': '0.6.1', 'torchao': '0.13.0', 'torch': '$TORCH_VERSION', 'wandb': '$WANDB_VERSION'}
sys.exit(any(version(p).split('+')[0] != v for p, v in want.items()))" 2>/dev/null; then
  echo "torchtune env ok: $VENV (set up before)"
  exit 0
fi

start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# This machine's pip config names local index folders that lack most packages, and pip warns about
# each; those lines say nothing about this install, so they are dropped.
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

# 1. torch, CPU build, before anything that depends on it.
quiet "${PIP[@]}" "torch==$TORCH_VERSION"
# 2. torchtune, the torchao it accepts and the rest, with torch held where it is. torchtune's other
#    dependencies (safetensors, tokenizers, huggingface_hub, datasets, sentencepiece, tiktoken,
#    blobfile, kagglehub, psutil, Pillow) come along; workers/train/torchtune/entry.py needs nothing more.
quiet "${PIP[@]}" "${PACKAGES[@]}"

check
touch "$STAMP"
echo "setup took $(( $(date +%s) - start ))s; python: $VENV/bin/python"
