#!/usr/bin/env bash
# Create .venv and install the project (idempotent: reinstalls only when pyproject.toml changes).
# Sourced by workflows/demo.sh and workflows/test.sh, so each README command is self-contained.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GENMODELS_VENV:-$REPO/.venv}"
PY="${PYTHON:-python3}"
stamp="$VENV/.genmodels-installed"
want="$(sha256sum "$REPO/pyproject.toml" | cut -c1-16)"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing genmodels and its dependencies into $VENV (first time: ~5 min)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first, pinned to the build this machine carries; a GPU cluster's image brings its own.
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    "$VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
  fi
  "$VENV/bin/python" -m pip install -q -e "$REPO[dev]"
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
# Offline-friendly defaults; a cluster with hub access can override them.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" NO_ALBUMENTATIONS_UPDATE=1 AWS_EC2_METADATA_DISABLED=true
export WANDB_MODE="${WANDB_MODE:-disabled}" TOKENIZERS_PARALLELISM=false
