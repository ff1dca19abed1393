"""Backward load balance of ``sparse_attention`` on real-mask-shaped layouts (issue 11), one GPU.

Run from the repository root on the GPU machine::

    PYTHONPATH=src python3 bench/bwd_balance.py --out bwd_balance.json

What it does:

1. gradient check (bf16 inputs, ``L=2048``, 60% sparsity by default, same heads/dim/block): a sink +
   band layout whose sink column is split, dQ/dK/dV against a float64 masked reference (relative norm error
   < 2e-2, the bf16 tolerance of ``tests/unit/test_kernels.py``), the split against the unsplit
   backward (< one bf16 ulp: 2**-7 relative) and split run twice (bitwise equal);
2. timing (bf16, ``B=4``, 9 query heads / 3 kv heads, ``d=64``, ``L=8192``, 128 x 128 blocks,
   causal unless ``--no-causal``) of

   (a) ``random``: the diagonal plus random blocks, 90% sparsity of the causally reachable blocks
       (as ``attnprune.bench.kernels.random_block_layout``), and
   (b) ``sink_band``: key block 0 in every row, a band at the diagonal, random blocks up to the
       same count per head as (a): the shape of the real AP masks,

   each with the dK/dV split on and off (``ATTNPRUNE_DKDV_SPLIT``, read at each call) and, unless
   ``--no-variants``, diagnostic variants of the chunk table (``VARIANTS``). Per run:
   ``torch.cuda.Event`` around CUDA-graph replays of fwd and fwd+bwd (``--warmup`` replays, then the
   median of ``--reps``; ``--eager`` times eager steps instead, which on the H200 machine here were
   host-bound: ~1 ms of launches per step for ~0.6 ms of kernels), and each kernel's GPU time from
   torch.profiler (``kernels_ms``; ``kernel_sums_ms``: dK/dV alone, and the whole backward).

The JSON holds the versions, device, arguments, the check's errors, per layout the split table
(tiles split, threshold, chunk cap, longest work item vs longest tile, in 128 x 128 blocks) and the
timings, plus ``ratio_split_on`` / ``ratio_split_off`` (``sink_band / random``, both with the split
on, or both off; ``kernels_dkdv``, ``kernels_bwd`` from the profiler) and
``ratio_sink_on_random_off``.

What to look at: ``ratio_split_on.bwd`` / ``.total`` and ``ratio_split_on.kernels_bwd``.

Expected outcome: with the split on, (b) within ~5% of (a) in the backward and in fwd+bwd
(``ratio_split_on`` ~0.95-1.05); with it off, (b) far slower in the backward (the sink tile's
program walks 3 x 64 blocks while the mean tile walks ~10, and the grid waits for it; the issue's
8-15% was the whole training step, where attention is a part). The forward does not change (the
split touches the dK/dV pass only); ``random`` changes little with the split (``split.n_split``: a
few tiles of column 0, which a causal random layout also makes the longest).

Measured (H200, torch 2.11.0+cu130, triton 3.6.0, defaults, 2026-12-02), medians in ms:

=============  =====  =====  =======  ============
layout, split  fwd    bwd    fwd+bwd  dK/dV kernel
=============  =====  =====  =======  ============
random, off    0.144  0.413  0.557    0.255
random, on     0.146  0.403  0.549    0.243
sink, off      0.132  1.269  1.401    1.132
sink, on       0.133  0.384  0.517    0.238
=============  =====  =====  =======  ============

``ratio_split_on``: bwd 0.95, total 0.94; ``ratio_split_off``: bwd 3.07, total 2.51; gradient check
max relative error 2.4e-3 against float64, split vs unsplit 8e-5, bitwise repeatable.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import torch  # noqa: E402

from attnprune.kernels import BlockLayout, sparse_attention  # noqa: E402

ENV = "ATTNPRUNE_DKDV_SPLIT"


def layouts(heads: int, nb: int, sparsity: float, causal: bool, band: int, seed: int):
    """(random, sink_band) bool ``[heads, nb, nb]`` with the same number of kept blocks per head."""
    g = torch.Generator().manual_seed(seed)
    reach = torch.ones(nb, nb, dtype=torch.bool)
    if causal:
        reach = reach.tril()
    target = max(nb, round((1.0 - sparsity) * int(reach.sum())))
    i = torch.arange(nb)
    diag = (i[:, None] == i[None, :])
    near = (i[:, None] - i[None, :] >= 0) & (i[:, None] - i[None, :] < band)
    if not causal:
        near = (i[:, None] - i[None, :]).abs() < band
    base_random = diag
    base_sink = (near | (i[None, :] == 0)) & reach

    def fill(base):
        out = base[None].repeat(heads, 1, 1)
        for h in range(heads):
            free = (reach & ~base).flatten().nonzero().flatten()
            extra = target - int(base.sum())
            if extra < 0:
                raise SystemExit(f"band {band} keeps more than {1 - sparsity:.0%} of the blocks: lower --band")
            pick = free[torch.randperm(free.numel(), generator=g)[:extra]]
            out[h].view(-1)[pick] = True
        return out

    return fill(base_random), fill(base_sink)


def split_info(lay: BlockLayout, L: int, causal: bool, hq: int, hkv: int) -> dict:
    sp = lay.dkdv_split(L, L, causal, 0, hq, hkv)
    if sp is None:
        plan = lay.plan(L, L, causal, 0)
        lens = (plan.bwd_ptr[1:] - plan.bwd_ptr[:-1]).long().cpu().reshape(lay.num_heads, lay.k_blocks)
        work = lens.reshape(hkv, hq // hkv, -1).sum(1) if lay.num_heads == hq else lens * (hq // hkv)
        return {"n_split": 0, "longest_tile": int(work.max()), "mean_tile": float(work[work > 0].float().mean())}
    items = sp.items.cpu()
    return {"n_split": sp.n_split, "n_items": sp.n_items, "n_slots": sp.n_slots, "threshold": sp.threshold,
            "cap": sp.cap,
            "max_chunks": int(sp.chunks.max()), "longest_tile": int(sp.work.max()),
            "longest_item": int((items[:, 3] - items[:, 2]).max()),
            "mean_tile": float(sp.work[sp.work > 0].float().mean())}


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def grad_check(args) -> dict:
    """bf16 kernel vs float64 reference on a smaller shape whose sink column is split."""
    L, hq, hkv, d, blk = args.check_length, args.heads, args.kv_heads, args.dim, args.block
    nb = -(-L // blk)
    _, keep = layouts(hq, nb, args.check_sparsity, args.causal, args.band, seed=1)
    lay = BlockLayout.from_blocks(keep.cuda(), (blk, blk))
    info = split_info(lay, L, args.causal, hq, hkv)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, h, L, d, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
               for h in (hq, hkv, hkv))
    go = torch.randn(1, hq, L, d, device="cuda", dtype=torch.bfloat16, generator=gen)

    def grads(split: bool):
        os.environ[ENV] = "1" if split else "0"
        out = sparse_attention(q, k, v, lay, causal=args.causal)
        return (out, *torch.autograd.grad(out, (q, k, v), go))

    on, on2, off = grads(True), grads(True), grads(False)
    allowed = lay.to_dense(L, L)[None]
    if args.causal:
        allowed = allowed & torch.ones(L, L, dtype=torch.bool, device="cuda").tril()
    G = hq // hkv
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    s = (qd @ kd.repeat_interleave(G, 1).transpose(-1, -2)) * d ** -0.5
    ref = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0) @ vd.repeat_interleave(G, 1)
    rgrads = torch.autograd.grad(ref, (qd, kd, vd), go.double())
    names = ("out", "dq", "dk", "dv")
    res = {"length": L, "split": info,
           "rel_err_vs_fp64": {n: rel(a, r) for n, a, r in zip(names, on, (ref, *rgrads))},
           "rel_split_vs_unsplit": {n: rel(a, b) for n, a, b in zip(names, on, off)},
           "bitwise_repeatable": all(torch.equal(a, b) for a, b in zip(on, on2))}
    res["ok"] = (info["n_split"] > 0 and max(res["rel_err_vs_fp64"].values()) < 2e-2
                 and max(res["rel_split_vs_unsplit"].values()) <= 2.0 ** -7 and res["bitwise_repeatable"])
    return res


def _stats(x) -> dict:
    x = sorted(x)
    return {"median": statistics.median(x), "p10": x[len(x) // 10], "p90": x[(9 * len(x)) // 10]}


def timed_eager(lay, q, k, v, do, causal, warmup, reps) -> dict:
    """Median / p10 / p90 ms of fwd, bwd and both from CUDA events around eager steps queued back to
    back (one synchronisation at the end). ``host_ms_per_step`` is the wall time per step: when it is
    about ``total``, the host's launches, not the GPU, set the pace (seen on the H200 machine here)."""
    import time

    def step(evs=None):
        q.grad = k.grad = v.grad = None
        if evs:
            evs[0].record()
        out = sparse_attention(q, k, v, lay, causal=causal)
        if evs:
            evs[1].record()
        out.backward(do)
        if evs:
            evs[2].record()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    evs = [[torch.cuda.Event(enable_timing=True) for _ in range(3)] for _ in range(reps)]
    t0 = time.perf_counter()
    for e in evs:
        step(e)
    torch.cuda.synchronize()
    host = (time.perf_counter() - t0) * 1e3 / reps
    res = {"fwd": _stats([e[0].elapsed_time(e[1]) for e in evs]), "bwd": _stats([e[1].elapsed_time(e[2]) for e in evs]),
           "total": _stats([e[0].elapsed_time(e[2]) for e in evs])}
    res["host_ms_per_step"] = host
    return res


def timed_graph(lay, q, k, v, do, causal, warmup, reps) -> dict:
    """Median / p10 / p90 ms from CUDA events around CUDA-graph replays of the forward alone and of
    forward + backward (``bwd`` = their difference of medians): GPU time, host launches excluded.
    The kernels and the chunk table are the ones in force at capture."""

    def fwd():
        with torch.no_grad():
            sparse_attention(q, k, v, lay, causal=causal)

    def both():
        sparse_attention(q, k, v, lay, causal=causal).backward(do)

    graphs = {}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles, plans) outside capture
        for _ in range(3):
            q.grad = k.grad = v.grad = None
            fwd()
            both()
    torch.cuda.current_stream().wait_stream(side)
    for name, fn in (("fwd", fwd), ("total", both)):
        q.grad = k.grad = v.grad = None
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        graphs[name] = g
    res = {}
    for name, g in graphs.items():
        for _ in range(warmup):
            g.replay()
        evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for e0, e1 in evs:
            e0.record()
            g.replay()
            e1.record()
        torch.cuda.synchronize()
        res[name] = _stats([e0.elapsed_time(e1) for e0, e1 in evs])
    res["bwd"] = {"median": res["total"]["median"] - res["fwd"]["median"]}
    del graphs
    return res


def timed(lay, q, k, v, do, causal, warmup, reps, graph=True) -> dict:
    """:func:`timed_graph`, or :func:`timed_eager` when ``graph`` is off or the capture fails."""
    if graph:
        try:
            return {"timing": "cuda_graph", **timed_graph(lay, q, k, v, do, causal, warmup, reps)}
        except Exception as e:  # keep going with eager timing, say why
            err = f"{type(e).__name__}: {e}"[:200]
            torch.cuda.synchronize()
            return {"timing": "eager", "graph_error": err, **timed_eager(lay, q, k, v, do, causal, warmup, reps)}
    return {"timing": "eager", **timed_eager(lay, q, k, v, do, causal, warmup, reps)}


def kernel_ms(lay, q, k, v, do, causal, steps=10) -> dict:
    """GPU ms per step of each kernel (torch.profiler), e.g. ``_dkdv_kernel`` vs ``_dkdv_items_kernel``
    + ``_dkdv_reduce_kernel``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            q.grad = k.grad = v.grad = None
            sparse_attention(q, k, v, lay, causal=causal).backward(do)
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None)
        t = e.cuda_time_total if t is None else t
        if t > 0:
            out[e.key[:60]] = round(t / steps / 1e3, 4)
    return dict(sorted(out.items(), key=lambda kv: -kv[1])[:8])


# diagnostic variants: (split env, build_dkdv_split keywords or None for the default table)
VARIANTS = {
    "split_off": ("0", None),
    "split_on": ("1", None),
    "chunk_factor2": ("1", {"chunk_factor": 2.0}),
    "chunk_factor0.5": ("1", {"chunk_factor": 0.5}),
    "factor1": ("1", {"factor": 1.0}),
    "tile_order": ("1", {"longest_first": False}),
    "items_nosplit": ("1", {"factor": 1e9, "force": True}),
}


def use_variant(lay, L, causal, hq, hkv, name):
    """Set the switch and put the variant's chunk table where ``sparse_attention`` looks it up."""
    from attnprune.kernels import _split

    env, kw = VARIANTS[name]
    os.environ[ENV] = env
    plan = lay.plan(L, L, causal, 0)
    plan.dkdv_splits.clear()
    if kw is not None:
        key = (hq, hkv, _split.MIN_CHUNK, _split.FACTOR, _split.CHUNK_FACTOR)
        plan.dkdv_splits[key] = _split.build_dkdv_split(plan.bwd_ptr, lay.num_heads, lay.k_blocks, hq, hkv, **kw)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--check-length", type=int, default=2048)
    ap.add_argument("--check-sparsity", type=float, default=0.6,
                    help="of the check's layout (at 16 blocks a row, 90%% leaves no room for sink + band)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--band", type=int, default=2, help="diagonal band width (blocks) of the sink layout")
    ap.add_argument("--no-causal", dest="causal", action="store_false")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--eager", dest="graph", action="store_false",
                    help="time eager steps instead of CUDA-graph replays (includes the host's launch time)")
    ap.add_argument("--no-variants", dest="variants", action="store_false",
                    help="time only split on/off (not the diagnostic variants: cap factor 1 and 4, tile order, "
                         "the item kernel with nothing split)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    import triton

    result = {"versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                           "python": platform.python_version()},
              "device": torch.cuda.get_device_name(), "args": vars(args)}

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    result["grad_check"] = grad_check(args)
    print("grad check:", json.dumps(result["grad_check"]))
    save()

    L, B, hq, hkv, d, blk = args.length, args.batch, args.heads, args.kv_heads, args.dim, args.block
    nb = -(-L // blk)
    rnd, sink = layouts(hq, nb, args.sparsity, args.causal, args.band, seed=0)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, h, L, d, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
               for h in (hq, hkv, hkv))
    do = torch.randn(B, hq, L, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    res = result.setdefault("layouts", {})
    for name, keep in (("random", rnd), ("sink_band", sink)):
        lay = BlockLayout.from_blocks(keep.cuda(), (blk, blk))
        entry = res[name] = {"kept_blocks_per_head": keep.sum((1, 2)).tolist(), "block_density": lay.density,
                             "split": split_info(lay, L, args.causal, hq, hkv)}
        names = list(VARIANTS) if args.variants else ["split_off", "split_on"]
        for mode in names:
            use_variant(lay, L, args.causal, hq, hkv, mode)
            entry[mode] = timed(lay, q, k, v, do, args.causal, args.warmup, args.reps, args.graph)
            try:
                entry[mode]["kernels_ms"] = kernel_ms(lay, q, k, v, do, args.causal)
            except Exception as e:  # the profiler is a diagnostic: keep the timings without it
                entry[mode]["kernels_ms"] = {"error": f"{type(e).__name__}: {e}"[:200]}
            km = entry[mode]["kernels_ms"]
            entry[mode]["kernel_sums_ms"] = {
                "dkdv": sum(t for n, t in km.items() if "dkdv" in n and not isinstance(t, str)),
                "bwd": sum(t for n, t in km.items() if any(w in n for w in ("dkdv", "_dq_", "_delta_"))
                           and not isinstance(t, str))}
            print(name, mode, {key: round(val["median"], 4) for key, val in entry[mode].items()
                               if isinstance(val, dict) and "median" in val}, entry[mode]["kernel_sums_ms"], km)
            save()
        use_variant(lay, L, args.causal, hq, hkv, "split_on")
    for mode in ("split_on", "split_off"):
        sb, rd = res["sink_band"][mode], res["random"][mode]
        result[f"ratio_{mode}"] = {key: sb[key]["median"] / rd[key]["median"] for key in ("fwd", "bwd", "total")}
        result[f"ratio_{mode}"].update({f"kernels_{key}": sb["kernel_sums_ms"][key] / max(rd["kernel_sums_ms"][key], 1e-9)
                                        for key in ("dkdv", "bwd")})
        print(f"sink_band / random, {mode}:", {key: round(val, 4) for key, val in result[f"ratio_{mode}"].items()})
    sb, rd = res["sink_band"]["split_on"], res["random"]["split_off"]
    result["ratio_sink_on_random_off"] = {key: sb[key]["median"] / rd[key]["median"] for key in ("fwd", "bwd", "total")}
    result["split_gain_sink_band_bwd"] = (res["sink_band"]["split_off"]["bwd"]["median"]
                                          / res["sink_band"]["split_on"]["bwd"]["median"])
    save()
    print("wrote", args.out)
    return 0 if result["grad_check"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
