#!/usr/bin/env bash
# One command: set up (first time) and run the whole test suite (CPU, offline).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/workflows/setup.sh"
cd "$REPO"
exec python -m pytest "$@"
