#!/usr/bin/env bash
# Create (if missing) the Python reference virtualenv at <repo>/.venv and install the pinned
# requirements. Idempotent: re-running only installs what is missing or has the wrong version.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating virtualenv at $VENV" >&2
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --progress-bar off --quiet --upgrade pip
fi

"$VENV/bin/python" -m pip install --progress-bar off -r "$ROOT/scripts/requirements-reference.txt"

"$VENV/bin/python" -c 'import torch, transformers, tokenizers, safetensors, numpy; print("torch", torch.__version__, "transformers", transformers.__version__, "tokenizers", tokenizers.__version__)'
