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
  echo "[setup] installing genmodels and its dependencies into $VENV (first time: ~2 min)"
  # uv installs the ~190 packages in ~1.5 min, bytecode included, where pip took ~4.5 min (2 cores,
  # cold cache). It reads no pip.conf, so the machine's pip settings for local wheels and constraints
  # are passed on. It compiles bytecode as pip does: where PYTHONDONTWRITEBYTECODE is set, nothing else
  # ever would, and every Ray worker would compile torch and Ray from source on import (BENCHMARKS.md).
  "$VENV/bin/python" -m pip install -q uv
  uv_args=()
  links="${PIP_FIND_LINKS:-$("$VENV/bin/python" -m pip config get global.find-links 2>/dev/null || true)}"
  constraint="${PIP_CONSTRAINT:-$("$VENV/bin/python" -m pip config get global.constraint 2>/dev/null || true)}"
  for l in $links; do uv_args+=(--find-links "$l"); done
  for c in $constraint; do [ -f "$c" ] && uv_args+=(--constraint "$c"); done
  # torch pinned to the build this machine carries; a GPU cluster's image brings its own.
  want_torch=()
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    want_torch=("torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}")
  fi
  "$VENV/bin/uv" pip install -q --compile-bytecode --python "$VENV/bin/python" "${uv_args[@]}" "${want_torch[@]}" -e "$REPO[dev]"
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
# Offline-friendly defaults; a cluster with hub access can override them.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" NO_ALBUMENTATIONS_UPDATE=1 AWS_EC2_METADATA_DISABLED=true
export WANDB_MODE="${WANDB_MODE:-disabled}" TOKENIZERS_PARALLELISM=false
