#!/usr/bin/env bash
# Create .venv (if missing) and install scd with its test extras. Idempotent; safe to re-run.
#
# torch first, the build for this machine: with an NVIDIA GPU (nvidia-smi on PATH) or on macOS the
# plain pinned wheel (CUDA, or CPU + MPS); on Linux or Windows without one the CPU build from
# PyTorch's CPU index, because a plain `pip install torch` there pulls the CUDA build (several GB of
# nvidia-* wheels). When that index cannot be reached (offline, a local wheelhouse in pip's
# find-links) it falls back to the plain pin, saying so; a torch of the pinned version already in
# the venv is kept. SCD_TORCH replaces the torch requirement (e.g. SCD_TORCH=torch on a CUDA
# machine), installed as given. SCD_SETUP_DRY_RUN=1 shows what a fresh install would do: pip
# resolves with --dry-run, nothing is created or installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_PIN=torch==2.13.0
CPU_INDEX=https://download.pytorch.org/whl/cpu
DRY=${SCD_SETUP_DRY_RUN:-}
say() { echo "setup: $*"; }

if [ -n "$DRY" ]; then
  pip_install() { "$PY" -m pip install --quiet --dry-run "$@"; }
else
  if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
  fi
  . .venv/bin/activate
  PY=python
  pip_install() { "$PY" -m pip install --quiet "$@"; }
fi

install_torch() {
  if [ -n "${SCD_TORCH:-}" ]; then
    say "torch: $SCD_TORCH (SCD_TORCH)"
    pip_install "$SCD_TORCH"
    return
  fi
  installed=$("$PY" -c "import torch; print(torch.__version__)" 2>/dev/null || true)
  if [ -z "$DRY" ] && [ "${installed%%+*}" = "${TORCH_PIN#torch==}" ]; then
    say "torch $installed is installed: kept"
    return
  fi
  if command -v nvidia-smi >/dev/null 2>&1 || [ "$(uname -s)" = Darwin ]; then
    say "torch: $TORCH_PIN (the default build: CUDA with an NVIDIA GPU, MPS on macOS)"
    pip_install "$TORCH_PIN"
    return
  fi
  say "torch: the CPU build of $TORCH_PIN (no NVIDIA GPU found), from $CPU_INDEX"
  if ! pip_install --index-url "$CPU_INDEX" --timeout 15 --retries 0 "$TORCH_PIN" 2>/dev/null; then
    say "$CPU_INDEX cannot be reached: installing $TORCH_PIN from pip's own indexes and find-links" \
        "(on Linux that may be the CUDA build, several GB: install the CPU build by hand when online)"
    pip_install "$TORCH_PIN"
  fi
}

stamp=.venv/.scd-installed
if [ -n "$DRY" ] || [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  [ -n "$DRY" ] || "$PY" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
  install_torch
  if [ -n "$DRY" ]; then
    say "then: pip install -e \".[test]\""
  else
    pip_install -e ".[test]"
    touch "$stamp"
  fi
fi
