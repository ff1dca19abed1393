"""What the softmax variants and sliding windows cost in the Triton kernels, one GPU (tenth session).

    PYTHONPATH=src python3 bench/variants_bench.py --out variants.json

On identical random 128 x 128 block layouts (``attnprune.bench.kernels.random_block_layout``, the diagonal
kept, causal), bf16, ``--heads`` query heads over ``--kv-heads`` kv heads, ``batch * length = --tokens``,
times (median, ``attnprune.bench.kernels.time_fn``: Triton's ``do_bench``) of ``sparse_attention``:

* ``plain``: the kernels as before;
* ``softcap``: Gemma 2's logit capping (the ``SOFTCAP`` kernels; bf16 on CUDA: the hardware ``tanh.approx``),
  next to ``softcap-exp2``, the same with ``ATTNPRUNE_FAST_TANH=0`` (a ``tanh`` from ``exp2`` and a division
  per score: the tenth session's kernels);
* ``sinks``: gpt-oss's attention sinks (folded into the forward kernel's epilogue);
* ``window``: the layout cut to a sliding window of ``--window`` tokens (``BlockLayout.windowed``:
  fewer blocks, a token-exact edge), next to ``window-blocks``, the same kept blocks without the
  token-exact edge (what the window would cost if it fell on block edges).

Before timing, each variant's forward is compared with the float64 reference on a small case (bf16,
relative error < 2e-2 as in the GPU kernel tests). Measured on an H100 (BENCHMARKS.md, 2026-12-05, the
tenth session's kernels): capped 1.73x / 1.67x plain at d 64 (fwd / fwd+bwd), 1.55x / 1.33x at d 128; sinks
1.21x / 1.07x and 1.24x / 1.04x (then three torch passes over o after the kernel). Expected for the eleventh
session's kernels: ``softcap`` 1.2-1.4x at d 64, 1.1-1.3x at d 128 (half the special-function ops of
``softcap-exp2``: ``bench/sass_stats.py --softcap [--fast-tanh]`` counts 279 vs 407 MUFU in the d-64 forward,
151 plain), ``softcap-exp2`` as before; sinks within 3% of plain; the window's time in proportion to its kept
blocks, the token-exact edge adding what a partial block costs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import torch  # noqa: E402

from attnprune.bench.kernels import random_block_layout, time_fn  # noqa: E402
from attnprune.environment import environment  # noqa: E402
from attnprune.kernels import sparse_attention  # noqa: E402
from attnprune.softmax import dense_attention  # noqa: E402

VARIANTS = ("plain", "softcap", "softcap-exp2", "sinks", "window", "window-blocks")
DEV = "cuda"  # --check-only on the CPU (TRITON_INTERPRET=1): the float64 checks alone, at 256 tokens


def variant_fn(name: str, layout, sinks: torch.Tensor, window: int, cap: float = 50.0):
    """``(fn(q, k, v), layout used)`` for one variant (``sinks``: the logits the ``sinks`` variant uses)."""
    if name.startswith("window"):
        cut = layout.windowed(window, 0)
        if name == "window-blocks":
            from attnprune.kernels import BlockLayout

            cut = BlockLayout.from_blocks(cut.block_mask(), cut.block)
        return (lambda q, k, v: sparse_attention(q, k, v, cut, causal=True)), cut
    kw = {"softcap": dict(softcap=cap), "softcap-exp2": dict(softcap=cap), "sinks": dict(sinks=sinks)}.get(name, {})
    return (lambda q, k, v: sparse_attention(q, k, v, layout, causal=True, **kw)), layout


@contextlib.contextmanager
def tanh_of(name: str):
    """``softcap-exp2``: the kernels' tanh from exp2 (``ATTNPRUNE_FAST_TANH=0``) for the whole block, forward
    and backward (the kernels read it at each launch); other variants: as configured."""
    old = os.environ.get("ATTNPRUNE_FAST_TANH")
    if name == "softcap-exp2":
        os.environ["ATTNPRUNE_FAST_TANH"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ATTNPRUNE_FAST_TANH", None)
        else:
            os.environ["ATTNPRUNE_FAST_TANH"] = old


def check(name: str, d: int, heads: int, kv: int, window: int, L: int = 1024) -> float:
    """Relative error of the variant's bf16 forward against float64 on an ``L``-token case."""
    layout = random_block_layout(heads, L, 0.5, causal=True, device=DEV)
    sinks = torch.randn(heads, device=DEV) * 2
    fn, used = variant_fn(name, layout, sinks, window, cap=2.0)
    dt = torch.bfloat16 if DEV == "cuda" else torch.float32  # (the interpreter's checks run in float32)
    q = torch.randn(1, heads, L, d, device=DEV, dtype=dt) * 2
    k = torch.randn(1, kv, L, d, device=DEV, dtype=dt)
    v = torch.randn(1, kv, L, d, device=DEV, dtype=dt)
    out = fn(q, k, v).double()
    allowed = used.to_dense(L, L)[None] & torch.ones(L, L, dtype=torch.bool, device=DEV).tril()
    kw = {"softcap": dict(softcap=2.0), "softcap-exp2": dict(softcap=2.0), "sinks": dict(sinks=sinks.double())}.get(name, {})
    ref = dense_attention(q.double(), k.double(), v.double(), allowed, False, None, **kw)
    return ((out - ref).norm() / ref.norm()).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384])
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--out", default=None)
    ap.add_argument("--check-only", action="store_true",
                    help="only the float64 checks, small (on the CPU: set TRITON_INTERPRET=1)")
    a = ap.parse_args()
    global DEV
    if a.check_only and not torch.cuda.is_available():
        DEV = "cpu"
    elif not torch.cuda.is_available():
        sys.exit("variants_bench.py times the kernels on a CUDA GPU; none is visible here (--check-only runs "
                 "the checks on the CPU under TRITON_INTERPRET=1)")
    rows, checks = [], {}
    for d in a.head_dims:
        for name in VARIANTS:
            with tanh_of(name):
                checks[f"{name}-d{d}"] = check(name, d, a.heads, a.kv_heads, 256 if not a.check_only else 64,
                                               1024 if not a.check_only else 256)
        if a.check_only:
            continue
        for L in a.lengths:
            B = max(1, a.tokens // L)
            layout = random_block_layout(a.heads, L, a.density, causal=True, device=DEV)
            q = torch.randn(B, a.heads, L, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
            k = torch.randn(B, a.kv_heads, L, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
            v = torch.randn(B, a.kv_heads, L, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
            base = {}
            for name in VARIANTS:
                fn, used = variant_fn(name, layout, torch.randn(a.heads, device=DEV), a.window)
                for mode in ("fwd", "fwd+bwd"):
                    with tanh_of(name):
                        ms = time_fn(fn, q, k, v, mode)
                    base.setdefault(mode, ms)
                    row = dict(variant=name, d=d, length=L, batch=B, mode=mode, ms=round(ms, 4),
                               vs_plain=round(ms / base[mode], 4), kept_blocks=used.nnz, partial=used.num_partial)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    print(json.dumps({"checks": checks}))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"environment": environment(), "args": vars(a), "checks": checks, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
