#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite offline. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec bash scripts/offline.sh .venv/bin/python -m pytest -q "$@"
