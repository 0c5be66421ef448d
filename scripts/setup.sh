#!/usr/bin/env bash
# Create .venv (if missing) and install scd with its test extras. Idempotent; safe to re-run.
# torch is pinned to the CPU build first so that pip does not pull a multi-GB CUDA build on
# machines without a GPU; set SCD_TORCH to choose another torch requirement.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.scd-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
  python -m pip install --quiet "${SCD_TORCH:-torch==2.13.0}"
  python -m pip install --quiet -e ".[test]"
  touch "$stamp"
fi
