#!/usr/bin/env bash
# One command: set up (first time), lint, and run the whole test suite (CPU, offline).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/workflows/setup.sh"
cd "$REPO"
# Lint first (a second), then the suite; smoke tests are opt-in: bash workflows/test.sh -m smoke
ruff check .
exec python -m pytest "$@"
