#!/usr/bin/env bash
# Set up (if needed) and continue the example clip with the embedded SCD model: writes out.mp4.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
scd generate --prompt-frames examples/world_prompt.mp4 --actions examples/world_next.actions.txt \
  --frames 24 --upscale 8 --include-prompt --out out.mp4 --report out.json "$@"
