#!/usr/bin/env bash
# The CLI on the example prompt: 24 frames, prompt included, enlarged 8x, with a JSON latency report.
# The prompt's own actions are read from examples/world_prompt.actions.txt (beside the clip).
set -euo pipefail
cd "$(dirname "$0")"
scd generate --prompt-frames world_prompt.mp4 --actions world_next.actions.txt --frames 24 \
  --include-prompt --upscale 8 --out ../example.mp4 --report ../example.json
