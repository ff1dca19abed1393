"""CLI subcommand ``bench``: time SDPA (cuDNN, flash), FlexAttention and the block-sparse kernels.

    attnprune bench --head-dims 128 --lengths 16384 --densities 1,0.5,0.1 -o bench.json --markdown table.md

Needs a CUDA GPU. Writes every measurement as JSON (with card, torch/triton versions, date and the
measured matrix-multiply ceiling) and, with ``--markdown``, the table used in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse

from ..errors import InvalidArgumentError, MissingDependencyError
from .common import check_output_file


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(x) for x in s.split(",") if x)


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark the block-sparse attention kernels (GPU)",
                       description="Time SDPA cuDNN, SDPA flash, FlexAttention and attnprune's Triton kernels "
                                   "on identical random block masks, forward and forward+backward.")
    p.add_argument("--head-dims", default="64,128", help="comma list (default 64,128)")
    p.add_argument("--lengths", default=None,
                   help="comma list of sequence lengths (default 4096,16384,32768; with --model 4096,8192,16384)")
    p.add_argument("--densities", default="1,0.5,0.1", help="fractions of 128x128 blocks kept (default 1,0.5,0.1)")
    p.add_argument("--causal", default="0,1", help="0, 1 or 0,1 (default both)")
    p.add_argument("--modes", default="fwd,fwd+bwd", help="fwd and/or fwd+bwd")
    p.add_argument("--impls", default="cudnn,flash,flex,ours", help="implementations to time")
    p.add_argument("--heads", type=int, default=16, help="query = kv heads (default 16)")
    p.add_argument("--tokens", type=int, default=32768, help="batch * length (default 32768)")
    p.add_argument("-o", "--output", default="bench.json", help="JSON file to write")
    p.add_argument("--markdown", default=None, help="also write the Markdown table here")
    wm = p.add_argument_group("whole-model benchmark (--model; see attnprune.modelbench)")
    wm.add_argument("--model", default=None,
                    help="time a whole model: smollm2, minilm, tiny-llama or tiny-bert (that model's architecture "
                         "built from its config, random weights; the old names smollm2-arch, ... still work); "
                         "prefill and a training step, dense vs masked")
    wm.add_argument("--sparsities", default="0.9", help="comma list of synthetic mask sparsities (default 0.9)")
    wm.add_argument("--backend", default="triton", help="attnprune backend for masked rows (default triton; "
                                                        "reference works anywhere)")
    wm.add_argument("--model-modes", default="prefill,train", help="prefill and/or train (default both)")
    wm.add_argument("--batch", type=int, default=1, help="sequences per batch (default 1)")
    wm.add_argument("--block", type=int, default=128, help="synthetic mask block size (default 128)")
    wm.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    wm.add_argument("--reps", type=int, default=3, help="timed runs, median reported (default 3)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    import torch

    if getattr(args, "model", None):
        from .. import modelbench

        return modelbench.cmd(args)
    if not torch.cuda.is_available():
        raise MissingDependencyError("attnprune bench needs a CUDA GPU (none is visible)")
    from ..kernels import benchmark as bm

    modes = tuple(m for m in args.modes.split(",") if m)
    impls = tuple(i for i in args.impls.split(",") if i)
    for m in modes:
        if m not in ("fwd", "fwd+bwd"):
            raise InvalidArgumentError(f"unknown mode {m!r}: use fwd and/or fwd+bwd")
    for i in impls:
        if i not in bm.IMPLS:
            raise InvalidArgumentError(f"unknown implementation {i!r}; known: {', '.join(bm.IMPLS)}")
    check_output_file(args.output)
    if args.markdown:
        check_output_file(args.markdown)
    env = bm.environment()
    print(env)
    ceiling = bm.matmul_ceiling()
    print(f"dense bf16 matmul ceiling: {ceiling:.0f} TFLOP/s")
    rows = bm.run_grid(head_dims=_ints(args.head_dims), lengths=_ints(args.lengths or "4096,16384,32768"),
                       densities=_floats(args.densities), causals=tuple(bool(int(c)) for c in args.causal.split(",")),
                       modes=modes, impls=impls, heads=args.heads, tokens=args.tokens)
    table = bm.markdown_table(rows)
    bm.save(args.output, {"env": env, "matmul_tflops": ceiling, "rows": rows, "table": table})
    if args.markdown:
        from .._io import write_text_atomic

        write_text_atomic(args.markdown, table + "\n")
    print(table)
    return 0
