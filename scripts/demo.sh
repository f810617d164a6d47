#!/usr/bin/env bash
# Set up (if needed) and run the demo: a short real LoRA fine-tune of the packaged
# SmolLM2-135M-Instruct on packaged chit-chat conversations, with answers before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec bash scripts/offline.sh .venv/bin/python train.py --config configs/smollm2-lora.yaml "$@"
