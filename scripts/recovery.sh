#!/usr/bin/env bash
# Recovery experiment (issue 5): SmolLM2-135M on Jane Austen, masks at 80/90/95% sparsity.
#
# Perplexity on the Austen test split
#   - before fine-tuning: dense, AP mask (layer policy), random mask (same kept count per layer);
#   - after K steps of masked fine-tuning (AP mask, and random mask), evaluated with that mask;
#   - after the same K steps of dense fine-tuning (the fair control: how much of the gain is just
#     adapting to Austen), evaluated dense and with the AP mask applied afterwards (prune after
#     fine-tuning).
# All runs start from the same pretrained weights, see the same training sequences in the same order
# (train split), and the mask is observed on the calibration split; calibration, train and test
# never overlap.
#
# Usage: bash scripts/recovery.sh [--steps K] [--seq-len L] [--batch-size B] [--lr LR] [--calib N]
#                                 [--test N] [--sparsities 0.8 0.9 0.95] [--out runs/recovery]
# Defaults are sized for a 2-core CPU (K=8 steps of 4 x 64 tokens); on a GPU use larger ones.
# Measured: 41 min wall on a 2-core CPU shared with other jobs (load ~7), see docs/recovery.md.
# Writes OUT/results.json, OUT/recovery.md (the table) and OUT/runs/<run>/metrics.jsonl.
# The experiment itself: src/attnprune/experiments/recovery.py.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && . .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m attnprune.experiments.recovery "$@"
