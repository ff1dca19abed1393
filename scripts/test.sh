#!/usr/bin/env bash
# The test suite (CPU). Triton kernels run under the Triton interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && . .venv/bin/activate
export TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest -rfEs --timeout=900 -p no:cacheprovider "$@"
