"""CLI subcommand ``bench``: time SDPA (cuDNN, flash), FlexAttention and the block-sparse kernels.

    attnprune bench --head-dims 128 --lengths 16384 --densities 1,0.5,0.1 -o bench.json --markdown table.md
    attnprune bench --model smollm2 --lengths 4096,16384 --sparsities 0.9 -o model.json   # whole model
    attnprune bench --model smollm2 --model-modes decode --lengths 8192 --batch 1,8 -o decode.json

The kernel grid needs a CUDA GPU. Writes every measurement as JSON (with the environment record,
the date and the measured matrix-multiply ceiling) and, with ``--markdown``, the table used in
BENCHMARKS.md. The benchmarks themselves are :mod:`attnprune.bench.kernels`, :mod:`attnprune.bench.model`
and :mod:`attnprune.bench.decode`.
"""

from __future__ import annotations

import argparse

from .._io import write_text_atomic
from ..errors import InvalidArgumentError, MissingDependencyError
from .common import add_list_argument, check_output_file, usable_device, use_shared, zero_one


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark the block-sparse attention kernels (GPU)",
                       description="Time SDPA cuDNN, SDPA flash, FlexAttention and attnprune's Triton kernels "
                                   "on identical random block masks, forward and forward+backward.")
    add_list_argument(p, "--head-dims", item=int, what="d", default=(64, 128), help="head dimensions (default 64,128)")
    add_list_argument(p, "--lengths", item=int, what="length", default=None,
                      help="sequence lengths (default 4096,16384,32768; with --model 4096,8192,16384)")
    add_list_argument(p, "--densities", item=float, default=(1.0, 0.5, 0.1),
                      help="fractions of 128x128 blocks kept (default 1,0.5,0.1)")
    add_list_argument(p, "--causal", item=zero_one, what="0/1", default=(False, True),
                      help="0, 1 or 0,1 (default both)")
    add_list_argument(p, "--modes", what="mode", default=("fwd", "fwd+bwd"), help="fwd and/or fwd+bwd")
    add_list_argument(p, "--impls", what="impl", default=None,
                      help="implementations to time (default all: cudnn, flash (SDPA dense), flex, flex-flash "
                           "(FlexAttention's FA4 kernels), fa4 (FlashAttention-4 direct), ours (triton), ours-flash "
                           "(backend='flash'); one missing on this machine gives rows with its error as the note)")
    p.add_argument("--heads", type=int, default=16, help="query heads (default 16)")
    p.add_argument("--kv-heads", type=int, default=None,
                   help="key/value heads, a divisor of --heads (default: --heads; fewer: grouped-query attention)")
    p.add_argument("--tokens", type=int, default=32768, help="batch * length (default 32768)")
    p.add_argument("--rounds", type=int, default=3,
                   help="kernel benchmark: timings per implementation, interleaved (every implementation once per "
                        "round, in a rotated order), median reported (default 3)")
    p.add_argument("-o", "--output", default="bench.json", help="JSON file to write")
    p.add_argument("--markdown", default=None, help="also write the Markdown table here")
    wm = p.add_argument_group("whole-model benchmark (--model; see attnprune.bench.model)")
    wm.add_argument("--model", default=None,
                    help="time a whole model: smollm2, gemma3-1b, minilm, tiny-llama or tiny-bert (that model's "
                         "architecture built from its config, random weights; the old names smollm2-arch, ... still work); "
                         "prefill and a training step, dense vs masked; --model-modes decode: generation, dense vs "
                         "masked vs masked with PrunedKVCache")
    add_list_argument(wm, "--sparsities", item=float, default=(0.9,),
                      help="synthetic mask sparsities (default 0.9)")
    add_list_argument(wm, "--model-modes", what="mode", default=("prefill", "train"),
                      help="prefill, train and/or decode (default prefill,train); decode (causal models): "
                           "greedy generation of --new-tokens after a prompt of each --lengths, dense, masked "
                           "(stock cache) and masked with attnprune.PrunedKVCache, under a synthetic sink + band "
                           "mask at each --sparsities (and each --masks file)")
    add_list_argument(wm, "--batch", item=int, what="batch", default=(1,),
                      help="sequences per batch, one or more (default 1)")
    wm.add_argument("--new-tokens", type=int, default=64,
                    help="decode: tokens generated after the prompt (default 64; >= 2: decode tok/s is the time "
                         "of N tokens minus that of 1)")
    add_list_argument(wm, "--decode-variants", what="variant", default=None,
                      help="decode: which of dense, dense-graph (StaticCache + CUDA graph), masked, pruned "
                           "(PrunedKVCache), pruned-graph (PrunedKVCache + CUDA graph) to time (default: all on "
                           "CUDA, dense masked pruned elsewhere)")
    wm.add_argument("--block", type=int, default=128, help="synthetic mask block size (default 128)")
    add_list_argument(wm, "--masks", what="file", default=(),
                      help="real masks (PruneMask files, e.g. from attnprune eval --save-masks), each timed at its "
                           "calibrated length next to a synthetic mask of the same sparsity")
    wm.add_argument("--plot", default=None, metavar="PNG",
                    help="also draw the speed-up over dense against achieved sparsity (prefill / train) here")
    wm.add_argument("--compile", default=None, metavar="MODE",
                    help="prefill / train rows (dense, no-attention and masked alike) under torch.compile("
                         "fullgraph=True): default, reduce-overhead (CUDA graphs), max-autotune, or aot_eager "
                         "(traced without code generation: checks that it compiles; no speed-up)")
    wm.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    wm.add_argument("--reps", type=int, default=3, help="timed runs, median reported (default 3)")
    use_shared(p, backend=("auto", "--model: attnprune backend for masked rows (default auto: flash on Hopper "
                                   "with FA4, triton on other GPUs, reference on the CPU)"),
               device=(None, "--model: cpu, cuda, cuda:1 (default: the GPU when present, else cpu); the kernel "
                             "grid runs on the GPU"))
    p.set_defaults(func=cmd_bench)


def _check_outputs(args) -> None:
    check_output_file(args.output)
    for extra in (args.markdown, args.plot):
        if extra:
            check_output_file(extra)


def _write_table(args, table: str) -> None:
    if args.markdown:
        write_text_atomic(args.markdown, table + "\n")
    print(table)


def cmd_bench(args) -> int:
    if getattr(args, "model", None):
        return cmd_model_bench(args)
    if args.plot:
        raise InvalidArgumentError("--plot draws the whole-model benchmark: give it with --model")
    if args.compile:
        raise InvalidArgumentError("--compile compiles the whole-model benchmark: give it with --model")
    import torch

    from ..bench import kernels as bm

    for m in args.modes:  # the arguments first, then the machine
        if m not in ("fwd", "fwd+bwd"):
            raise InvalidArgumentError(f"unknown mode {m!r}: use fwd and/or fwd+bwd")
    args.impls = tuple(args.impls or bm.IMPLS)
    if args.rounds < 1:
        raise InvalidArgumentError(f"--rounds must be at least 1, got {args.rounds}")
    if args.kv_heads is not None and (args.kv_heads < 1 or args.heads % args.kv_heads):
        raise InvalidArgumentError(f"--kv-heads must divide --heads ({args.heads}), got {args.kv_heads}")
    for i in args.impls:
        if i not in bm.IMPLS:
            raise InvalidArgumentError(f"unknown implementation {i!r}; known: {', '.join(bm.IMPLS)}")
    if not torch.cuda.is_available():
        raise MissingDependencyError("attnprune bench needs a CUDA GPU (none is visible)")
    _check_outputs(args)
    env = bm.environment()
    print(env)
    ceiling = bm.matmul_ceiling()
    print(f"dense bf16 matmul ceiling: {ceiling:.0f} TFLOP/s")
    rows = bm.run_grid(head_dims=args.head_dims, lengths=args.lengths or (4096, 16384, 32768),
                       densities=args.densities, causals=args.causal, modes=args.modes, impls=args.impls,
                       heads=args.heads, tokens=args.tokens, rounds=args.rounds, kv_heads=args.kv_heads)
    table = bm.markdown_table(rows)
    bm.save(args.output, {"env": env, "matmul_tflops": ceiling, "rows": rows, "table": table})
    _write_table(args, table)
    return 0


def cmd_model_bench(args) -> int:
    """``attnprune bench --model ARCH``: the whole-model grid."""
    from ..bench import model as mb
    from ..policies import check_sparsity

    arch = mb.resolve_arch(args.model)
    _check_outputs(args)
    lengths = args.lengths or (4096, 8192, 16384)
    for s in args.sparsities:
        check_sparsity(s)
    if any(n < 1 for n in lengths):
        raise InvalidArgumentError(f"--lengths must be positive integers, got {list(lengths)}")
    if any(b < 1 for b in args.batch):
        raise InvalidArgumentError(f"--batch must be >= 1, got {list(args.batch)}")
    mb.check_modes(arch, args.model_modes, args.new_tokens)
    from ..bench.compiled import check_compile

    check_compile(args.compile, args.model_modes)
    if args.plot and not {"prefill", "train"} & set(args.model_modes):
        raise InvalidArgumentError("--plot draws prefill / train rows against sparsity: add --model-modes prefill "
                                   "or train")
    if args.plot:
        from ..plots import need_pyplot

        need_pyplot()  # before the benchmark, not after it
    if args.decode_variants is not None:
        from ..bench.decode import ALL_VARIANTS

        bad = [v for v in args.decode_variants if v not in ALL_VARIANTS]
        if bad or "decode" not in args.model_modes:
            raise InvalidArgumentError(f"--decode-variants {' '.join(args.decode_variants)}: give decode variants "
                                       f"({', '.join(ALL_VARIANTS)}) with --model-modes decode")
    from pathlib import Path

    from ..backends import resolve_backend
    from ..mask import PruneMask

    masks = {}
    for f in args.masks:
        if not Path(f).is_file():
            raise InvalidArgumentError(f"--masks: {f} is not a file (give PruneMask files saved by mask.save)")
        masks[Path(f).stem] = PruneMask.load(f)
    mb.check_modes(arch, args.model_modes, args.new_tokens, lengths, args.batch, masks)
    device = usable_device(args.device)
    backend = resolve_backend(args.backend, device)
    env = mb.environment(device)
    print(env)
    rows = mb.run(arch, lengths, args.sparsities, backend=backend, modes=args.model_modes, batch=args.batch,
                  block=args.block, warmup=args.warmup, reps=args.reps, device=device, masks=masks,
                  new_tokens=args.new_tokens, decode_variants=args.decode_variants, compile_mode=args.compile)
    table = mb.markdown_table(rows)
    mb.save(args.output, {"env": env, "arch": arch, "backend": backend, "backend_asked": args.backend,
                          "compile": args.compile,
                          "block": args.block, "masks": list(args.masks), "modes": list(args.model_modes),
                          "new_tokens": args.new_tokens, "rows": rows, "table": table})
    _write_table(args, table)
    if args.plot:
        from ..bench.plot import plot_speed

        plot_speed([r for r in rows if r.mode in ("prefill", "train")], args.plot,
                   title=f"{arch}, backend {backend}")
        print(f"plot: {args.plot}")
    return 0
