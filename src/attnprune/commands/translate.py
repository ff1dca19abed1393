"""``attnprune translate``: the translation experiment (attention pruning by attention type).

    attnprune translate --preset tiny --out runs/translation-tiny          # CPU smoke run, minutes
    attnprune translate --preset gpu --out runs/translation                # the real one, ~8 min on an H100
    attnprune translate --preset gpu --data-file .gpu/bible-en-es.jsonl --out $OUT/translation

Trains a BPE tokenizer and a small BART (English -> Spanish, ``bible-en-es``) from scratch, observes
its attention, makes AP and random masks at each sparsity restricted to encoder self-attention,
decoder self-attention, cross-attention or all of them, retrains the dense model with each mask and
scores greedy translations of the test split with sacreBLEU. Writes ``results.json``,
``results.md`` and PNG plots into ``--out`` (see ``attnprune.experiments.translation``).
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from .common import check_output_dir, usable_device


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``translate`` subcommand."""
    p = sub.add_parser("translate", help="translation experiment: prune encoder/decoder/cross attention, BLEU",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=("tiny", "gpu"),
                   help="tiny: CPU smoke run; gpu: the real experiment on one GPU (default tiny)")
    p.add_argument("--out", "-o", required=True, help="output folder (results.json, results.md, PNG plots)")
    p.add_argument("--data-file", default=None,
                   help="JSONL written by scripts/export_bible.py (default: the bible-en-es source)")
    p.add_argument("--train-steps", type=int, default=None, help="dense training steps (preset's default)")
    p.add_argument("--retrain-steps", type=int, default=None,
                   help="masked retraining steps per mask, at most (preset's default)")
    p.add_argument("--batch-size", type=int, default=None, help="sentence pairs per step")
    p.add_argument("--sparsities", type=_floats, default=None, help="comma-separated, e.g. 0.5,0.7,0.9")
    p.add_argument("--types", type=_names, default=None, help="comma-separated: encoder,decoder,cross,all")
    p.add_argument("--policies", type=_names, default=None, help="comma-separated: layer,random")
    p.add_argument("--max-train-examples", type=int, default=None, help="use only the first N training pairs")
    p.add_argument("--max-test-examples", type=int, default=None, help="score only the first N test pairs")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; lowers the retraining steps so the run fits (0: off; gpu preset: 420)")
    p.add_argument("--no-zero-shot", action="store_true", help="skip BLEU of each mask before retraining")
    p.add_argument("--precision", default=None, choices=("auto", "fp32", "bf16"))
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: GPU if present)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--plots-only", action="store_true",
                   help="only (re)make the PNG plots of an existing --out folder (needs matplotlib)")
    p.set_defaults(func=cmd_translate)


def cmd_translate(args: argparse.Namespace) -> int:
    """Run the experiment with the preset and overrides given on the command line."""
    from ..experiments.translation import PRESETS, run_experiment, write_plots

    if args.plots_only:
        for path in write_plots(args.out):
            print(path)
        return 0
    check_output_dir(args.out)
    usable_device(args.device)  # the device the experiment will pick; checked before the data and training
    cfg = PRESETS[args.preset]
    overrides = {
        "train_steps": args.train_steps, "retrain_steps": args.retrain_steps, "batch_size": args.batch_size,
        "sparsities": args.sparsities, "types": args.types, "policies": args.policies,
        "max_train_examples": args.max_train_examples, "max_test_examples": args.max_test_examples,
        "precision": args.precision, "device": args.device, "seed": args.seed,
    }
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if args.time_budget is not None:
        cfg = replace(cfg, time_budget_s=args.time_budget or None)
    if args.no_zero_shot:
        cfg = replace(cfg, zero_shot=False)
    quiet = getattr(args, "quiet", False)
    res = run_experiment(cfg, args.out, data_file=args.data_file, progress=not quiet, log=print)
    print()
    from ..experiments.translation import results_markdown

    print(results_markdown(res), end="")
    return 0
