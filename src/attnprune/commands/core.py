"""CLI subcommands ``observe``, ``mask`` and ``info``.

    attnprune observe --model tiny-gpt2 --data random --num-seqs 16 --seq-len 64 -o stats.safetensors
    attnprune observe --model smollm2 --data text:notes.txt -o stats.safetensors   # the whole file
    torchrun --nproc-per-node 2 -m attnprune observe ...   # data-parallel: batches split, sums all-reduced
    attnprune mask stats.safetensors --sparsity 0.9 --policy layer [--block 64] -o mask.safetensors
    attnprune info mask.safetensors        # or a stats file
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ..errors import CorruptFileError, InvalidArgumentError
from .common import check_output_file, check_policies, usable_device, use_shared


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("observe", help="record a model's mean attention on a dataset",
                       description="Run a model over a dataset and save its mean attention probabilities.")
    p.add_argument("--model", required=True, help="model spec: tiny-gpt2, tiny-llama, tiny-bert, tiny-bart, "
                   "tiny-sdpa, hf:/path/to/dir, ...")
    p.add_argument("--data", default="random", help="data source (default: random token ids)")
    p.add_argument("--split", default=None,
                   help="observe this split of the data (default: a named corpus's calibration split; all of "
                        "your own text:/jsonl:/hf: file, or its calibration split when it is a folder of splits)")
    p.add_argument("--num-seqs", type=int, default=16, help="number of sequences (default 16)")
    p.add_argument("--seq-len", type=int, default=64, help="sequence length in tokens (default 64)")
    p.add_argument("--min-len", type=int, default=None,
                   help="random data: draw lengths in [min-len, seq-len] (padding); default all seq-len")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default 8)")
    p.add_argument("--granularity", type=int, default=1, help="accumulate g x g blocks (default 1: tokens)")
    use_shared(p, seed=(0, "data seed (default 0)"),
               device=(None, "cpu, cuda, cuda:1 (default: cuda:<local rank> when a GPU is present, else cpu)"))
    p.add_argument("-o", "--output", required=True, help="stats file to write (.safetensors)")
    p.set_defaults(func=cmd_observe)

    p = sub.add_parser("mask", help="derive a pruning mask from observed attention",
                       description="Keep the strongest attention entries of a stats file as a static mask.")
    p.add_argument("stats", help="stats file written by `attnprune observe`")
    p.add_argument("--sparsity", type=float, required=True, help="fraction of attendable entries to prune, in [0, 1)")
    p.add_argument("--policy", default="layer", help="a mask policy: layer (the paper's, default), head, global, "
                   "random, structured, structured-global, streaming, elastic, elastic-site, elastic-floor "
                   "(attnprune.policies)")
    p.add_argument("--block", type=int, default=None, help="select whole b x b blocks (for block kernels)")
    p.add_argument("--length-free", choices=("stats", "mask"), default="stats",
                   help="past the calibrated length (beyond='extend', PrunedKVCache) continue each head with sinks "
                        "and a band fitted from the stats to keep the share of each row's attention the mask keeps "
                        "(stats, default), or fitted from the mask itself (mask: fewer entries, lower quality)")
    p.add_argument("--extend-mass", default=None, metavar="SHARE|kept",
                   help="with --length-free stats: keep this share of each row's attention past the calibrated "
                        "length instead ('kept', the default: what the mask keeps per head)")
    use_shared(p, seed=(0, "seed of the random policy (default 0)"))
    p.add_argument("-o", "--output", required=True, help="mask file to write (.safetensors)")
    p.set_defaults(func=cmd_mask)

    p = sub.add_parser("info", help="summarise a stats or mask file")
    p.add_argument("file", help="a stats or mask file")
    p.set_defaults(func=cmd_info)


USER_SOURCES = ("text", "jsonl", "hf")  # a user's own data: observed whole unless --split is given
WHOLE = "all"  # the one split of a user's file read whole


def _source(args):
    """``(dataset, split)`` to observe, or ``None`` for ``--data random``: ``--split`` if given; else all
    of a user's own file (a folder of split files: its calibration split); else the calibration
    split of a named corpus (or its first split). Loaded before the model, so bad data fails fast."""
    if args.data == "random":
        return None
    from .. import data

    opts = {}
    source = args.data.partition(":")[0]
    if source == "random":  # random:<vocab>
        opts = dict(num_seqs=args.num_seqs, seq_len=args.seq_len, seed=args.seed)
    elif source in USER_SOURCES and args.split is None:
        opts = dict(fractions={WHOLE: 1.0})  # a single file becomes one split; a folder keeps its files
    ds = data.load_dataset(args.data, **opts)
    split = args.split or next((s for s in (WHOLE, "calibration") if s in ds.splits), next(iter(ds.splits)))
    ds[split]  # an unknown --split fails here, naming the splits there are
    return ds, split


def _batches(args, loaded, src):
    """The observation batches, a description of them and a line saying what data was used (or None)."""
    if src is None:
        from ..data.random import RandomTokens

        if loaded.vocab_size < 1:
            raise InvalidArgumentError(f"model {args.model!r} has no known vocabulary size for random data")
        if args.seq_len > loaded.max_length:
            raise InvalidArgumentError(f"--seq-len {args.seq_len} exceeds the model's maximum length "
                                       f"{loaded.max_length}")
        if args.min_len is not None and args.min_len < args.seq_len and loaded.extra.get("padding") is False:
            raise InvalidArgumentError(f"model {args.model!r} does not support padding; drop --min-len")
        pad = getattr(getattr(loaded.model, "config", None), "pad_token_id", None)
        data = RandomTokens(loaded.vocab_size, args.num_seqs, args.seq_len, args.batch_size, seed=args.seed,
                            min_len=args.min_len, pad_id=pad if isinstance(pad, int) else 0,
                            low=min(3, loaded.vocab_size - 1))
        return data, data.describe(), None
    from ..data.inputs import inputs_for

    ds, split = src
    records = ds[split]
    inputs = inputs_for(loaded, ds, any_task=True)  # observation needs no labels: any model reads text
    batches = inputs.batches(records, loaded.tokenizer, seq_len=args.seq_len, batch_size=args.batch_size,
                             max_items=args.num_seqs, max_length=args.seq_len)
    n = sum(int(b["input_ids"].shape[0]) for b in batches)
    what = f"all of {ds.name}" if split == WHOLE else f"split {split!r} of {ds.name}"
    short = f" (all there are; --num-seqs {args.num_seqs})" if n < args.num_seqs else ""
    rest = [s for s in ds.splits if s != split]
    note = (f"observe: using {what}: {len(records)} records, {n} sequences{short}"
            + (f"; not its splits {', '.join(rest)} (choose with --split)" if rest else ""))
    return batches, ds.describe(split), note


def cmd_observe(args) -> int:
    """Observe; under ``torchrun`` each rank takes every ``world``-th batch, the sums are all-reduced
    (NCCL on GPUs, gloo on the CPU) and rank 0 alone writes the file."""
    import itertools

    import torch

    from ..models import load_model
    from ..observe import observe
    from ..runtime import init_distributed

    check_output_file(args.output)
    device = usable_device(args.device)
    rank, world = init_distributed()
    src = _source(args)
    loaded = load_model(args.model)
    loaded.model.to(device)
    batches, description, note = _batches(args, loaded, src)
    if rank == 0 and note:
        print(note, file=sys.stderr, flush=True)
    if world > 1:
        import torch.distributed as dist

        shard = itertools.islice(batches, rank, None, world)
        first = next(shard, None)
        have = torch.tensor([first is not None], dtype=torch.int32, device=device)
        dist.all_reduce(have, op=dist.ReduceOp.MIN)  # every rank must agree before raising
        if not int(have.item()):
            raise InvalidArgumentError(f"a process got no batch to observe: {world} processes need at least "
                                       f"{world} batches; use fewer processes or more --num-seqs")
        batches = itertools.chain([first], shard)
        description = f"{description} (observed by {world} processes)"
    stats = observe(loaded.model, batches, granularity=args.granularity, progress=not args.quiet and rank == 0,
                    description=description)
    if world > 1:
        stats.all_reduce()
    stats.model_name = loaded.name or stats.model_name
    if rank == 0:
        stats.save(args.output)
        print(f"wrote {args.output}: {len(stats.sites)} sites, {stats.num_sequences} sequences, "
              f"granularity {stats.granularity}" + (f" ({world} processes)" if world > 1 else ""))
    return 0


def cmd_mask(args) -> int:
    from ..policies import make_mask
    from ..stats import AttentionStats

    check_output_file(args.output)
    check_policies([args.policy])  # before the stats are read
    mass = _extend_mass(args.extend_mass)
    if args.extend_mass is not None and args.length_free == "mask":
        raise InvalidArgumentError("--extend-mass is for --length-free stats (the form fitted from the stats), "
                                   "not --length-free mask; drop one of them")
    stats = AttentionStats.load(args.stats)
    mask = make_mask(stats, args.sparsity, policy=args.policy, block=args.block, seed=args.seed,
                     length_free=args.length_free)
    if mass is not None:
        mask = mask.with_length_free(stats, mass=mass)
    mask.save(args.output)
    print(f"wrote {args.output}")
    print(mask.summary())
    return 0


def _extend_mass(text: str | None) -> float | None:
    """``--extend-mass``: None (not given, or 'kept') or a share in (0, 1]."""
    from ..errors import InvalidArgumentError

    if text is None or text == "kept":
        return None
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not 0 < v <= 1:
        raise InvalidArgumentError(f"--extend-mass must be a share in (0, 1] or 'kept', got {text!r}")
    return v


def cmd_info(args) -> int:
    kind = file_format(args.file)
    if kind == "attnprune.mask":
        from ..mask import PruneMask

        print(PruneMask.load(args.file).summary())
    else:
        from ..stats import AttentionStats

        print(stats_summary(AttentionStats.load(args.file)))
    return 0


def file_format(path) -> str:
    """The ``format`` field of an attnprune file's header; ``CorruptFileError`` if there is none."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise InvalidArgumentError(f"{p}: no such file")
    try:
        with safe_open(str(p), framework="pt") as f:
            fmt = json.loads((f.metadata() or {})["attnprune"])["format"]
    except Exception:
        raise CorruptFileError(f"{p}: truncated, corrupted or not an attnprune stats or mask file") from None
    if fmt not in ("attnprune.mask", "attnprune.stats"):
        raise CorruptFileError(f"{p}: unknown attnprune file format {fmt!r}")
    return fmt


def stats_summary(stats) -> str:
    """A readable table of an ``AttentionStats``: per site kind, heads, lengths and observed entries."""
    lines = [f"attnprune stats: model {stats.model_name or '?'}, {len(stats.sites)} sites, "
             f"granularity {stats.granularity}, {stats.num_sequences} sequences",
             f"data: {stats.description or '?'}", ""]
    rows = [("site", "kind", "heads", "kv", "q x k", "observed", "max mean")]
    for site in stats.sites:
        info = stats.infos[site]
        if hasattr(stats, "observed") and not stats.observed(site):
            rows.append((site, info.kind, str(info.num_heads), str(info.num_kv_heads), "-", "0", "-"))
            continue
        mean = stats.mean(site)
        seen = ~mean.isnan()
        mx = float(mean[seen].max()) if seen.any() else math.nan
        rows.append((site, info.kind, str(info.num_heads), str(info.num_kv_heads),
                     f"{stats.q_len(site)}x{stats.k_len(site)}", f"{float(seen.float().mean()):.3f}", f"{mx:.4f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join(lines + [fmt(rows[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows[1:]])
