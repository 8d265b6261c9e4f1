#!/usr/bin/env bash
# One command: set up (first time) and run the whole pipeline on the embedded demo (local Ray, CPU).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/workflows/setup.sh"
cd "$REPO"
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
exec python workflows/full_pipeline.py --config workflows/configs/demo.yaml "$@"
