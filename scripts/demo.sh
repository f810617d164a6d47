#!/usr/bin/env bash
# Set up (if needed) and run the demo: a short real LoRA fine-tune of the packaged
# SmolLM2-135M-Instruct on packaged chit-chat conversations, with answers before and after.
# train.py with no --config and no key=value overrides announces the demo (steps, output, expected
# time and memory) and runs it; overrides apply to the same recipe, configs/smollm2-lora.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
for arg in "$@"; do
  case "$arg" in
    *=*) exec bash scripts/offline.sh .venv/bin/python train.py --config configs/smollm2-lora.yaml "$@" ;;
  esac
done
exec bash scripts/offline.sh .venv/bin/python train.py "$@"
