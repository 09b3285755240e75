#!/usr/bin/env bash
# The README's test command: set up (idempotent), lint, run the CPU test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
bash scripts/setup.sh
.venv/bin/ruff check src tests scripts
.venv/bin/python -m pytest -q -m "not gpu" "$@"
