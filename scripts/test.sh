#!/usr/bin/env bash
# The README's test command: set up (idempotent), lint, run the CPU test suite (the GPU tests and those that
# need a llama.cpp build are marked and run where those exist: pytest -m gpu, pytest -m llama_cpp).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
bash scripts/setup.sh
.venv/bin/ruff check src tests scripts
.venv/bin/python -m pytest -q -m "not gpu and not llama_cpp" "$@"
