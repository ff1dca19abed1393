"""A/B of how the Triton kernels read token-exact bitmasks (GPU; one process per variant).

Until 2026-12-05 every masked tile loaded the bitmask word of each of its elements (``BLOCK_M x BLOCK_N``
gathered loads); now it loads one word per (row, 32 columns) and spreads it over the columns
(``kernels._triton_bwd._bits_ok``). ``ATTNPRUNE_TRITON_BITS=gather`` (read at import) restores the old
loads, so the stage runs this script twice and compares the two JSON files.

Prediction, written before any GPU run: on the H200 run of 2026-12-02 (bench/results/fa4_check_h200_2026-12-02_run2.json)
the Triton kernels with 20% of their kept 128 x 128 blocks token-exact took 1.75-2.67x their block-exact time
forward (d 64: 2.5-2.7x, d 128: 1.75-1.9x) and 1.4-2.2x forward+backward; a masked tile of d 64 cost about
9x a clean one. Compiled for sm90 on the CPU with the GPU's Triton 3.6 (bench/sass_stats.py, BENCHMARKS.md) the old
reads staged the word tile through shared memory (forward d 128: 160 KiB per program, now 98 KiB, so two programs
per SM instead of one; d 64: 64 -> 33 KiB) with 4-10% more instructions and no spills at d 64. Expected: the
token-exact overhead falls, most at d 128; at d 64 it may barely move, and then the cost of a masked tile lies in the
rest of the masked path (predicated K/V loads, per-element compares, no TMA).

    python3 bench/bits_ab.py --out rows.json
    ATTNPRUNE_TRITON_BITS=gather python3 bench/bits_ab.py --out gather.json
    python3 bench/bits_ab.py --compare rows.json gather.json

Rows: d 64 / 128, 4k / 16k tokens (32k tokens per batch), 16 heads, bf16, not causal and causal, block
density 0.5 and 0.1 (random layouts as ``attnprune bench``), fwd and fwd+bwd; per row the block-exact time,
the 20%-token-exact time (the same blocks, ``fa4_check._with_partial``) and their ratio; every time the
median of 3 interleaved rounds of ``attnprune.bench.kernels.time_fn``; a float64 check of the token-exact
forward on a small case first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))


def check(dev="cuda") -> float:
    """Relative forward error of the token-exact kernel against float64 on a small odd-shaped case."""
    from fa4_check import _with_partial

    from attnprune.bench.kernels import random_block_layout
    from attnprune.kernels import sparse_attention

    L = 1000
    lay = _with_partial(random_block_layout(4, L, 0.6, causal=True, seed=3, device=dev), 0.3, seed=3)
    q, k, v = (torch.randn(1, 4, L, 64, device=dev, dtype=torch.bfloat16) for _ in range(3))
    out = sparse_attention(q, k, v, lay, causal=True).double()
    allowed = lay.to_dense(L, L)[None] & torch.ones(L, L, dtype=torch.bool, device=dev).tril()
    s = (q.double() @ k.double().transpose(-1, -2)) * 64 ** -0.5
    ref = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0) @ v.double()
    return float((out - ref).norm() / ref.norm())


def rows(rounds: int = 3) -> list[dict]:
    from fa4_check import _with_partial

    from attnprune.bench.kernels import random_block_layout, time_fn
    from attnprune.kernels import sparse_attention

    out = []
    for d in (64, 128):
        for L in (4096, 16384):
            B = max(1, 32768 // L)
            for causal in (False, True):
                for dens in (0.5, 0.1):
                    lay = random_block_layout(16, L, dens, causal=causal, seed=L + d)
                    tok = _with_partial(lay, 0.2, seed=L + d)
                    q, k, v = (torch.randn(B, 16, L, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
                               for _ in range(3))
                    fns = {"block": lambda q, k, v: sparse_attention(q, k, v, lay, causal=causal),
                           "tok20": lambda q, k, v: sparse_attention(q, k, v, tok, causal=causal)}
                    for mode in ("fwd", "fwd+bwd"):
                        t = {n: [] for n in fns}
                        for r in range(rounds):
                            for n in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                                t[n].append(time_fn(fns[n], q, k, v, mode, warmup=10, rep=50))
                        med = {n: sorted(x)[len(x) // 2] for n, x in t.items()}
                        row = {"d": d, "L": L, "batch": B, "causal": causal, "density": dens, "mode": mode,
                               "block_ms": med["block"], "tok20_ms": med["tok20"],
                               "ratio": round(med["tok20"] / med["block"], 3), "rounds": t}
                        print(json.dumps({k: v for k, v in row.items() if k != "rounds"}), flush=True)
                        out.append(row)
                    del q, k, v
                    torch.cuda.empty_cache()
    return out


def compare(a_path: str, b_path: str) -> None:
    a, b = (json.load(open(p)) for p in (a_path, b_path))
    print(f"| d | L | causal | density | mode | {a['variant']} tok20/block | {b['variant']} tok20/block | "
          f"tok20 ms {a['variant']} / {b['variant']} |")
    print("|---|---|---|---|---|---|---|---|")
    key = lambda r: (r["d"], r["L"], r["causal"], r["density"], r["mode"])
    other = {key(r): r for r in b["rows"]}
    for r in a["rows"]:
        o = other.get(key(r))
        if o:
            print(f"| {r['d']} | {r['L'] // 1024}k | {r['causal']} | {r['density']} | {r['mode']} | {r['ratio']} | "
                  f"{o['ratio']} | {r['tok20_ms'] / o['tok20_ms']:.3f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bits_ab.json")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="print the table of two result files")
    a = ap.parse_args()
    if a.compare:
        return compare(*a.compare)
    if not torch.cuda.is_available():
        sys.exit("bits_ab.py needs a CUDA GPU")
    from attnprune.environment import environment

    variant = os.environ.get("ATTNPRUNE_TRITON_BITS", "rows")
    res = {"variant": variant, "env": environment(), "check_rel_err": check()}
    print(f"variant {variant}: token-exact forward vs float64, relative error {res['check_rel_err']:.2e}", flush=True)
    res["rows"] = rows(a.rounds)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    main()
