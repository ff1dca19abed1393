"""Issue 9 on a GPU: backend="flash" (FlashAttention-4 block sparsity) vs float64, and its speed.

    PYTHONPATH=/tmp/site:src python3 bench/fa4_check.py --out /tmp/runs/fa4_check.json [--quick]

(a) correctness: the flash backend's output and q/k/v gradients vs the float64 reference backend on
random token masks (odd lengths, GQA, causal, key padding, empty rows); (b) timings on identical
128 x 128 random block layouts (bf16, 16 heads): cuDNN dense SDPA, FA4 direct (flash_attn_func with
metadata built here by hand), our flash backend's kernel (``flash``: NATIVE_CAUSAL=True, FA4's causal path where it applies;
``flash_mod``: causality through the mask_mod, the default), our Triton kernels. Every variant runs in
try/except; an error is recorded as text. Prints a markdown table; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import torch


def err_text(e):
    return f"{type(e).__name__}: {str(e)[:300]}"


def correctness():
    from attnprune.backends import BACKENDS
    from attnprune.mask import SiteMask
    from attnprune.sites import SiteInfo

    out = []
    from attnprune.backends import flash

    cases = [("odd", 2, 4, 4, 64, 333, 333, False, False, False), ("gqa", 2, 8, 2, 128, 260, 517, False, False, False),
             ("causal", 2, 4, 4, 64, 700, 700, True, False, False), ("padding", 2, 4, 4, 64, 400, 400, True, True, False),
             ("empty", 1, 4, 4, 64, 300, 300, False, False, True), ("decode_offset", 1, 4, 4, 64, 1, 300, True, False, False)]
    # block-exact 128-block masks, causal: FA4's native causal path (and the mask_mod path, for comparison)
    cases += [(f"{n}_blocks{'' if native else '_mod'}", *rest) for native in (True, False) for n, *rest in
              (("causal", 2, 4, 4, 64, 700, 700, True, False, False), ("gqa_causal", 1, 8, 2, 128, 1000, 1000, True,
               False, False), ("decode_offset", 1, 4, 4, 64, 1, 700, True, False, False))]
    for name, B, H, Hkv, D, lq, lk, causal, pad, empty in cases:
        row = {"case": name}
        flash.NATIVE_CAUSAL = not name.endswith("_mod")
        try:
            torch.manual_seed(0)
            rows = lk if name.startswith("decode_offset") else lq
            if "_blocks" in name:
                nb = -(-lk // 128)
                blocks = torch.rand(H, nb, nb) < 0.5
                blocks[:, :, 0] = True  # a sink column
                site = SiteMask(SiteInfo("layers.0.self_attn", "self", H, Hkv), rows, lk, keep=blocks, block=128)
            else:
                keep = torch.rand(H, rows, lk) < 0.5
                if empty:
                    keep[1, :140] = False
                site = SiteMask(SiteInfo("layers.0.self_attn", "self", H, Hkv), keep.shape[1], lk, keep=keep)
            q = torch.randn(B, H, lq, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            k = torch.randn(B, Hkv, lk, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            v = torch.randn(B, Hkv, lk, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            kw = dict(is_causal=causal)
            if name.startswith("decode_offset"):
                kw["q_offset"] = lk - 1
            if pad:
                m = torch.ones(B, 1, 1, lk, dtype=torch.bool, device="cuda")
                m[-1, ..., lk // 2:] = False
                kw["attn_mask"] = m
            o = BACKENDS.get("flash")(q, k, v, site, **kw)
            do = torch.randn_like(o)
            g = torch.autograd.grad(o, (q, k, v), do)
            t64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
            r = BACKENDS.get("reference")(*t64, site, **kw)
            rg = torch.autograd.grad(r, t64, do.double())
            for nm, a, b in zip(("out", "dq", "dk", "dv"), (o, *g), (r, *rg)):
                row[nm + "_max_abs"] = float((a.double() - b).abs().max())
                row[nm + "_finite"] = bool(torch.isfinite(a).all())
        except Exception as e:  # noqa: BLE001
            row["error"] = err_text(e)
            row["trace"] = traceback.format_exc()[-1500:]
        print(json.dumps({k: v for k, v in row.items() if k != "trace"}))
        out.append(row)
    flash.NATIVE_CAUSAL = False
    return out


def timings(lengths, budget: float):
    from attnprune.backends import flash
    from attnprune.backends.flash import fa4_metadata, flash_sparse_attention
    from attnprune.bench.kernels import random_block_layout
    from attnprune.kernels import sparse_attention

    def evt(fn, mode, q, k, v, reps=5):
        do = None
        for _ in range(2):
            o = fn(q, k, v)
            if mode != "fwd":
                do = torch.randn_like(o) if do is None else do
                o.backward(do)
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(reps):
            if mode == "fwd":
                with torch.no_grad():
                    fn(q, k, v)
            else:
                q.grad = k.grad = v.grad = None
                fn(q, k, v).backward(do)
        e.record()
        torch.cuda.synchronize()
        return s.elapsed_time(e) / reps

    def fa4_direct(layout, causal):
        from flash_attn.cute import flash_attn_func
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

        def f(q, k, v):
            L = q.shape[2]
            # whole blocks, the causal future dropped; FA4's own causal=True masks the diagonal
            meta = fa4_metadata(layout, L, L, causal=causal)
            fw = BlockSparseTensorsTorch(*meta["fwd"], block_size=(128, 128))
            bw = BlockSparseTensorsTorch(*meta["bwd"], block_size=(128, 128))
            r = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                                pack_gqa=False, block_sparse_tensors=fw, block_sparse_tensors_bwd=bw)
            return (r[0] if isinstance(r, tuple) else r).transpose(1, 2)
        return f

    rows = []
    t_start = time.time()
    for d in (64, 128):
        for L in lengths:
            B = max(1, 32768 // L)
            for causal in (False, True):
                for dens in (1.0, 0.5, 0.1):
                    if time.time() - t_start > budget:
                        rows.append({"d": d, "L": L, "causal": causal, "density": dens, "error": "time budget"})
                        continue
                    layout = random_block_layout(16, L, dens, causal=causal, seed=L + d)
                    q, k, v = (torch.randn(B, 16, L, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
                               for _ in range(3))
                    tok = _with_partial(layout, 0.2, seed=L + d) if not causal and dens < 1 else None
                    impls = {
                        "cudnn": lambda q, k, v: _cudnn(q, k, v, causal),
                        "fa4_direct": fa4_direct(layout, causal),
                        "flash": _causal_path(flash, layout, causal, True),
                        **({"flash_mod": _causal_path(flash, layout, causal, False)} if causal else {}),
                        "triton": lambda q, k, v: sparse_attention(q, k, v, layout, causal=causal),
                    }
                    if tok is not None:  # the same kept blocks, 20% of them token-exact (half their bits)
                        impls["flash_tok20"] = lambda q, k, v: flash_sparse_attention(q, k, v, tok, causal=False)
                        impls["triton_tok20"] = lambda q, k, v: sparse_attention(q, k, v, tok, causal=False)
                    for mode in ("fwd", "fwd+bwd"):
                        row = {"d": d, "L": L, "batch": B, "causal": causal, "density": dens, "mode": mode}
                        for name, fn in impls.items():
                            try:
                                row[name + "_ms"] = evt(fn, mode, q, k, v)
                            except Exception as e:  # noqa: BLE001
                                row[name + "_error"] = err_text(e)
                        print(json.dumps(row))
                        rows.append(row)
                    del q, k, v
                    torch.cuda.empty_cache()
    return rows


def _with_partial(layout, share: float, seed: int):
    """``layout`` with a random ``share`` of its kept blocks made partial (random bitmasks, about half
    of each block's entries): the token-exact case at the same block count."""
    from attnprune.kernels import BlockLayout

    g = torch.Generator().manual_seed(seed)
    n = layout.col.numel()
    pick = torch.randperm(n, generator=g)[: int(share * n)].sort().values
    code = torch.full((n,), -1, dtype=torch.int32)
    code[pick] = torch.arange(pick.numel(), dtype=torch.int32)
    bq, bk = layout.block
    bits = torch.randint(-2**31, 2**31 - 1, (pick.numel(), bq, (bk + 31) // 32), generator=g, dtype=torch.int32)
    dev = layout.col.device
    return BlockLayout(layout.num_heads, layout.q_blocks, layout.k_blocks, layout.block, layout.row, layout.col,
                       code.to(dev), bits.to(dev), layout.q_len, layout.k_len)


def _causal_path(flash, layout, causal, native: bool):
    """The flash backend with NATIVE_CAUSAL set to ``native`` for the call (native causal vs mask_mod)."""
    def f(q, k, v):
        before, flash.NATIVE_CAUSAL = flash.NATIVE_CAUSAL, native
        try:
            return flash.flash_sparse_attention(q, k, v, layout, causal=causal)
        finally:
            flash.NATIVE_CAUSAL = before
    return f


def _cudnn(q, k, v, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)


def table(rows):
    names = ("cudnn", "fa4_direct", "flash", "flash_mod", "triton", "flash_tok20", "triton_tok20")
    lines = ["| d | L | causal | density | mode | " + " | ".join(n + " ms" for n in names) + " |",
             "|---|---|---|---|---|" + "---|" * len(names)]
    for r in rows:
        if "mode" not in r:
            continue
        cells = [f"{r[n + '_ms']:.3f}" if n + "_ms" in r else "err" for n in names]
        lines.append(f"| {r['d']} | {r['L']} | {r['causal']} | {r['density']} | {r['mode']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="fa4_check.json")
    ap.add_argument("--quick", action="store_true", help="L = 4096 only")
    ap.add_argument("--lengths", default=None, help="comma-separated lengths (default 4096,16384)")
    ap.add_argument("--budget", type=float, default=170.0, help="seconds for the timings (rows past it: skipped)")
    a = ap.parse_args()
    res = {"torch": torch.__version__, "device": torch.cuda.get_device_name()}
    try:
        import flash_attn.cute as fc
        res["fa4"] = getattr(fc, "__version__", "?")
    except Exception as e:  # noqa: BLE001
        res["fa4_error"] = err_text(e)
    res["correctness"] = correctness()
    try:
        lengths = [int(x) for x in a.lengths.split(",")] if a.lengths else ([4096] if a.quick else [4096, 16384])
        res["timings"] = timings(lengths, a.budget)
    except Exception as e:  # noqa: BLE001
        res["timings_error"] = err_text(e)
        res["timings"] = []
    print(table(res["timings"]))
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    main()
