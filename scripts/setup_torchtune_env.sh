#!/usr/bin/env bash
# Creates the isolated Python environment that the torchtune training backend runs in.
#
#   bash scripts/setup_torchtune_env.sh            # -> /work/main/.venv-torchtune (the repo's .venv-torchtune)
#   NEWSLORA_TORCHTUNE_VENV=/opt/tt bash scripts/setup_torchtune_env.sh
#
# Why a separate environment: torchtune 0.6.1 (the last release; the project is no longer maintained)
# needs torchao <= 0.13, while PEFT 0.21 in the main venv refuses any torchao older than 0.16 once
# torchao is importable. So the main venv has no torchao and no torchtune, and
# `workers/train/torchtune_backend.py` runs torchtune's recipe in a subprocess with this
# environment's python (override with NEWSLORA_TORCHTUNE_PYTHON=/path/to/python).
#
# torch is installed FIRST and pinned to the CPU build that lies on this machine's disk: a looser
# pin, or letting torchtune pull torch, downloads a multi-GB CUDA build.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NEWSLORA_TORCHTUNE_VENV:-$REPO/.venv-torchtune}"
PYTHON="${PYTHON:-python3.11}"
TORCH_VERSION="${NEWSLORA_TORCHTUNE_TORCH:-2.13.0}"

start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# This machine's pip config names local index folders that lack most packages; pip warns once per
# package about each. Those lines say nothing about this install, so they are dropped.
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

# 1. torch, CPU build, before anything that depends on it.
quiet "${PIP[@]}" "torch==$TORCH_VERSION"
# 2. torchtune and the torchao it accepts, with torch held where it is.
#    torchtune's own dependencies (omegaconf, safetensors, tokenizers, huggingface_hub, datasets,
#    sentencepiece, tiktoken, blobfile, kagglehub, psutil, Pillow, torchdata) come along.
quiet "${PIP[@]}" "torch==$TORCH_VERSION" "torchtune==0.6.1" "torchao==0.13.0"
# torchtune_entry.py imports nothing beyond torchtune and its dependencies.

"$VENV/bin/python" - <<'EOF'
import torch, torchao, torchtune
from torchtune.models.llama3_2 import lora_llama3_2  # noqa: F401
from torchtune.training import FullModelHFCheckpointer  # noqa: F401
import importlib.util, pathlib
# The recipes ship in the wheel as plain files (their folder refuses to be imported as a package).
recipes = pathlib.Path(importlib.util.find_spec("torchtune").origin).parents[1] / "recipes"
assert (recipes / "lora_finetune_single_device.py").is_file(), f"recipe missing under {recipes}"
print(f"torchtune env ok: torch {torch.__version__}, torchao {torchao.__version__}, torchtune {torchtune.__version__}")
EOF
echo "setup took $(( $(date +%s) - start ))s; python: $VENV/bin/python"
