#!/usr/bin/env bash
# llama.cpp for newslora's GGUF checks and the peer bench: llama-cpp-python compiles llama.cpp from its PyPI
# source package (about 6 minutes on 2 cores). The wheel is built once per machine and cached, so a second
# install (a fresh clone, CI) takes seconds.  Usage: scripts/install_llamacpp.sh [PYTHON]
set -euo pipefail
PY="${1:-.venv/bin/python}"
VERSION=0.3.36
CACHE="${NEWSLORA_WHEEL_CACHE:-$HOME/.cache/newslora-wheels}"
if "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama_cpp_python') != '$VERSION')" 2>/dev/null; then
  exit 0
fi
mkdir -p "$CACHE"
wheel=$(ls "$CACHE"/llama_cpp_python-$VERSION-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
  echo "building llama-cpp-python $VERSION (compiles llama.cpp, ~6 min on 2 cores; cached in $CACHE)" >&2
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$PY" -m pip wheel -q --no-deps "llama-cpp-python==$VERSION" -w "$CACHE"
  wheel=$(ls "$CACHE"/llama_cpp_python-$VERSION-*.whl | head -1)
fi
"$PY" -m pip install -q "$wheel" "diskcache>=5.6.1" "typing-extensions>=4.5.0"
