#!/usr/bin/env bash
# Run a command with no network but loopback, as CI does (Ray/Flower, hub look-ups and W&B
# cannot reach anything). Falls back to running it plainly where namespaces are unavailable.
set -euo pipefail
export WANDB_MODE=offline HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
       FLWR_TELEMETRY_ENABLED=0 RAY_USAGE_STATS_ENABLED=0
flags=(--net)
[ "$(id -u)" = 0 ] || flags+=(--map-root-user)
if unshare "${flags[@]}" true 2>/dev/null; then
  exec unshare "${flags[@]}" bash -c 'ip link set lo up && exec "$@"' bash "$@"
fi
echo "offline.sh: network namespaces unavailable; running with the network" >&2
exec "$@"
