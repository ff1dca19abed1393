"""``attnprune eval``: quality versus attention sparsity for a model on a dataset.

    attnprune eval --model smollm2 --data austen --seq-len 256 --calib 32 --test 16 -o runs/eval
    attnprune eval --model minilm --data sentiment --train 4000 --calib 1000 --test 1000 -o runs/eval-minilm
    attnprune eval --device cuda --seq-len 8192 --calib 8 --test 8 --batch-size 1 --blocks 128 \
        --policies layer structured streaming random --scores prob value --ood-data text:bible-en.txt \
        --save-masks -o runs/long8k          # long context: block statistics, masks the kernels skip

Causal LMs are scored by perplexity on the dataset's ``test`` split, classifiers by accuracy (a
linear head is first trained on the ``train`` split; ``--finetune`` trains the encoder too).
Attention is observed on the ``calibration`` split, which never overlaps the test split.
Writes ``report.md``, ``results.json``, PNG plots and ``stats.safetensors`` (``stats-<score>.safetensors``
for other scores; ``masks/`` with ``--save-masks``) into ``--out``.
The workflow is ``attnprune.experiments.sweep.run_eval``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..experiments.sweep_loop import DEFAULT_POLICIES, DEFAULT_SPARSITIES
from ..mask import BEYOND
from .common import add_list_argument, use_shared


def _block(v: str) -> int | None:
    if v.lower() in ("0", "none", "token"):
        return None
    try:
        b = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"block size must be an integer or 'token', not {v!r}") from None
    if b < 1:
        raise argparse.ArgumentTypeError(f"block size must be positive, not {b}")
    return b


def _score(v: str) -> str:
    from ..observe import SCORES

    if v not in SCORES:
        raise argparse.ArgumentTypeError(f"unknown score {v!r}; choose from {', '.join(SCORES)}")
    return v


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    add_list_argument(p, "--sparsities", item=float, default=None,
                      help=f"target sparsities in [0, 1) (default {' '.join(map(str, DEFAULT_SPARSITIES))})")
    add_list_argument(p, "--policies", what="policy", default=None, help=f"mask policies (default {' '.join(DEFAULT_POLICIES)})")
    add_list_argument(p, "--blocks", item=_block, what="block", default=None,
                      help="granularities: 'token' for token level, an integer b for b x b blocks (default: token 16); "
                           "without 'token' attention is observed on blocks (memory bounded at long lengths)")
    add_list_argument(p, "--scores", item=_score, what="score", default=None,
                      help="what ranks the masks, each observed once: prob (the paper's mean attention), value "
                           "(probability x value norm), influence (|first-order loss change|; causal LMs), loss (the signed "
                           "first-order loss change, the expected loss increase of removing an entry), ablation (each head's "
                           "measured loss with only sinks + a band of k blocks, k on a grid: heads x widths forwards per "
                           "calibration batch, so use a few windows; blocks only) (default prob)")
    p.add_argument("--ablation-batches", type=int, default=None, metavar="N",
                   help="score ablation: profile only the first N calibration batches (default all; each batch costs "
                        "heads x widths forwards)")
    p.add_argument("--ablation-base", type=int, default=None, metavar="K",
                   help="score ablation: measure each head around a pruned model (every head keeps the sinks and a band "
                        "of K blocks) instead of the dense one; K near the width the target sparsity allows")
    p.add_argument("--ablation-widths", type=int, nargs="+", default=None, metavar="K",
                   help="score ablation: the band widths (blocks) to profile (default 1 2 3 4 6 8 12 16 24 32 48 ... below "
                        "the site's size); fewer widths, fewer forwards")
    use_shared(p, seed=(0, "seed for the random policy and torch (default 0)"), backend="auto", device=None)
    p.add_argument("-o", "--out", default=None, help="output folder (default runs/eval-<model>-<data>)")
    p.add_argument("--no-heatmaps", action="store_true", help="skip the attention heatmap plots")
    p.add_argument("--save-masks", action="store_true",
                   help="write every mask to OUT/masks/<score>-<policy>-<sparsity>-<granularity>.safetensors "
                        "(e.g. for attnprune bench --model ... --masks)")


def register(sub) -> None:
    p = sub.add_parser("eval", help="quality vs attention sparsity (perplexity or accuracy), with a report",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="model spec (smollm2, minilm, hf:<dir>, tiny-gpt2, ...)")
    p.add_argument("--data", default="austen", help="data spec (austen, sentiment, text:<file>, jsonl:<file>, ...)")
    p.add_argument("--seq-len", type=int, default=256, help="causal LM: tokens per sequence (default 256)")
    p.add_argument("--calib", type=int, default=None,
                   help="calibration size: sequences (LM, default 32) or examples (classifier, default 1000)")
    p.add_argument("--test", type=int, default=None,
                   help="test size: sequences (LM, default 16) or examples (classifier, default 1000)")
    p.add_argument("--train", type=int, default=4000, help="classifier: training examples for the head (default 4000)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size (default 8; classifiers at least 32)")
    p.add_argument("--max-length", type=int, default=64, help="classifier: max tokens per example (default 64)")
    p.add_argument("--finetune", action="store_true", help="classifier: fine-tune the encoder with the head")
    p.add_argument("--epochs", type=int, default=1, help="classifier with --finetune: fine-tuning epochs (default 1)")
    p.add_argument("--lr", type=float, default=None, help="classifier with --finetune: AdamW learning rate (default 2e-5)")
    p.add_argument("--stats", default=None, help="reuse attention stats observed earlier on the calibration split")
    p.add_argument("--beyond", choices=BEYOND, default="error",
                   help="inputs longer than the calibrated length: error (default), dense there, or extend "
                        "(each head's sinks and band continued)")
    p.add_argument("--ood-data", default=None,
                   help="causal LM: a second data spec (e.g. text:bible.txt) whose --ood-split is measured too, "
                        "dense and under every mask (text of another domain than the calibration data)")
    p.add_argument("--ood-split", default="test", help="the split of --ood-data to measure (default test)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="the model's weights during the run (default auto: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--calib-split", default="calibration",
                   help="the data's split attention is observed on (default calibration; e.g. train for more "
                        "windows than the calibration split holds)")
    p.add_argument("--test-split", default="test", help="the split quality is measured on (default test)")
    p.add_argument("--train-split", default="train", help="classifier: the split the head is trained on (default train)")
    add_sweep_arguments(p)
    p.set_defaults(func=main)


def main(args) -> int:
    from ..experiments.sweep import EvalSettings, run_eval

    s = EvalSettings(
        model=args.model, data=args.data,
        out=args.out or f"runs/eval-{args.model.replace(':', '-')}-{Path(args.data).name.replace(':', '-')}",
        calib_split=args.calib_split, train_split=args.train_split, test_split=args.test_split,
        seq_len=args.seq_len, calib=args.calib, test=args.test, train=args.train, batch_size=args.batch_size,
        max_length=args.max_length, finetune=args.finetune, epochs=args.epochs, lr=args.lr,
        sparsities=tuple(args.sparsities or DEFAULT_SPARSITIES), policies=tuple(args.policies or DEFAULT_POLICIES),
        blocks=tuple(args.blocks) if args.blocks else (None, 16), seed=args.seed, backend=args.backend,
        scores=tuple(dict.fromkeys(args.scores or ("prob",))), ablation_batches=args.ablation_batches,
        ablation_base=args.ablation_base,
        ablation_widths=tuple(args.ablation_widths) if args.ablation_widths else None, ood_data=args.ood_data, ood_split=args.ood_split,
        beyond=args.beyond, device=args.device, stats=args.stats, heatmaps=not args.no_heatmaps,
        save_masks=args.save_masks, dtype=args.dtype,
        progress=not args.quiet,
    )
    files = run_eval(s)
    print_outputs(files)
    return 0


def print_outputs(files: dict) -> None:
    print("wrote:")
    for k in ("markdown", "json", "quality_plot", "kept_mass_plot", "heatmaps", "stats", "masks"):
        v = files.get(k)
        if v is None:
            continue
        for p in (v if isinstance(v, list) else [v]):
            print(f"  {p}")
