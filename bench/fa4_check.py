"""Issue 9 on a GPU: backend="flash" (FlashAttention-4 block sparsity) vs float64, and its speed.

    PYTHONPATH=/tmp/site:src python3 bench/fa4_check.py --out /tmp/runs/fa4_check.json [--quick]

(a) correctness: the flash backend's output and q/k/v gradients vs the float64 reference backend on
random token masks (odd lengths, GQA, causal, key padding, empty rows); (b) timings on identical
128 x 128 random block layouts (bf16, 16 heads): cuDNN dense SDPA, FA4 direct (flash_attn_func with
metadata built here by hand), our flash backend's kernel (``flash``: NATIVE_CAUSAL=True, FA4's causal path where it applies;
``flash_mod``: causality through the mask_mod, the default), our Triton kernels. Every variant runs in
try/except; an error is recorded as text. Prints a markdown table; writes JSON.

``--variants split`` (gpu_session.sh stage ``fa4split``): only what decides ``ATTNPRUNE_FA4_PARTIAL``
(:mod:`attnprune.backends._flash_split`). (a) the token-mask correctness cases with ``PARTIAL="mask_mod"`` and
``"split"`` (rows ``<case>_split``), each error also norm-relative with ``within_tol`` against
``4 * (eps_bf16 + (D + Lk) * eps_fp32)`` (gradients twice that; the bound of tests/unit/test_flash_split.py);
(b) timings of the token-exact rows only (20% of the kept blocks partial, causal and not): ``flash`` (the same
blocks block-exact: the baseline), ``flash_tok20`` (mask_mod), ``flash_split_tok20`` (the split), its two parts
alone -- ``split_fa4_full`` (FA4 on the full-only layout) and ``split_triton_part`` (Triton on the partial /
diagonal / end-of-keys blocks) -- and ``split_triton_part_nobits`` (Triton on the same blocks treated as whole
blocks: what the bitmask costs Triton). Per row it prints split/flash, mod/flash, the parts' sum/flash and
the merge's share (split - parts). ``--variants all`` (default) adds ``flash_split_tok20`` to the full table.

What should move, and by how much (fa4_check_h200_2026-12-02_run2.json, the 16 token-exact rows):
* mask_mod: 1.30x-1.85x the block-exact ``flash`` time (median 1.64x).
* The issue's model for the split: FA4 block-exact on the 80% full blocks (0.8x) + Triton on the 20% partial
  blocks at its block-exact cost per block (1.47x FA4, median: +0.29x) = about 1.1x, plus fixed costs that do
  not shrink with density: the merge (one launch reading both outputs and writing one, 3 x B*H*L*Dv x 2 bytes:
  about 0.05-0.07 ms at d 64 and 0.1-0.13 ms at d 128 with B*L = 32k, i.e. 2-10% of the 50%-density rows but
  up to 20-35% of the 10%-density 4k rows) and, in fwd+bwd, each part's own rowsum(dO*O) pass and the
  dq/dk/dv sums (a similar amount). So 1.1x-1.4x by this model; the target (within 15% of ``flash``) at best
  on the dense-enough rows. ``merge_ms`` (split - its parts) gives the fixed costs directly.
* But the same run suggests Triton's *bitmask* blocks cost far more than its whole blocks: taking
  ``triton_tok20 - 0.8 * triton`` as Triton's time on the partial 20%, a partial block costs Triton 4.4x-11.6x
  an FA4 whole block (median 7.9x), which predicts the split at 1.7x-3.1x (median 2.4x), *slower* than
  mask_mod (d 128 fwd+bwd rows 1.7-1.95x vs 1.30-1.37x). ``split_triton_part`` against
  ``split_triton_part_nobits`` measures this directly: if the bitmask costs Triton several times the block,
  the lever is the Triton kernel's bitmask path (one int32 word gathered per element,
  kernels/_triton.py), not the split, and ``mask_mod`` stays the default.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import torch


def err_text(e):
    return f"{type(e).__name__}: {str(e)[:300]}"


def tol_bf16(D, Lk, grad=False):
    """Norm-relative bound of tests/unit/test_flash_split.py for bf16: 4 * (eps_bf16 + (D + Lk) * eps_fp32)."""
    t = 4 * (torch.finfo(torch.bfloat16).eps + (D + Lk) * torch.finfo(torch.float32).eps)
    return 2 * t if grad else t


def correctness(variants="all"):
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
    token = [c for c in cases if "_blocks" not in c[0]]
    if variants == "split":  # token masks only, each with the mask_mod and the split
        cases = token + [(f"{n}_split", *rest) for n, *rest in token]
    else:
        cases += [(f"{n}_split", *rest) for n, *rest in token]
    for name, B, H, Hkv, D, lq, lk, causal, pad, empty in cases:
        row = {"case": name}
        flash.NATIVE_CAUSAL = not name.endswith("_mod")
        flash.PARTIAL = "split" if name.endswith("_split") else "mask_mod"
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
            ok = True
            for nm, a, b in zip(("out", "dq", "dk", "dv"), (o, *g), (r, *rg)):
                row[nm + "_max_abs"] = float((a.double() - b).abs().max())
                row[nm + "_rel"] = float((a.double() - b).norm() / b.norm().clamp_min(1e-30))
                row[nm + "_finite"] = bool(torch.isfinite(a).all())
                ok = ok and row[nm + "_finite"] and row[nm + "_rel"] < tol_bf16(D, lk, grad=nm != "out")
            row["within_tol"] = ok
        except Exception as e:  # noqa: BLE001
            row["error"] = err_text(e)
            row["trace"] = traceback.format_exc()[-1500:]
        print(json.dumps({k: v for k, v in row.items() if k != "trace"}))
        out.append(row)
    flash.NATIVE_CAUSAL = True  # the defaults
    flash.PARTIAL = "mask_mod"
    return out


def timings(lengths, budget: float, variants: str = "all", rounds: int = 3):
    """Rows of timings; every implementation measured ``rounds`` times, interleaved, median kept."""
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
                    if variants == "split" and dens >= 1:
                        continue
                    if time.time() - t_start > budget:
                        rows.append({"d": d, "L": L, "causal": causal, "density": dens, "error": "time budget"})
                        continue
                    layout = random_block_layout(16, L, dens, causal=causal, seed=L + d)
                    q, k, v = (torch.randn(B, 16, L, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
                               for _ in range(3))
                    tok = None
                    if dens < 1 and (not causal or variants == "split"):
                        tok = _with_partial(layout, 0.2, seed=L + d)
                    impls = {
                        "cudnn": lambda q, k, v: _cudnn(q, k, v, causal),
                        "fa4_direct": fa4_direct(layout, causal),
                        "flash": _flash_with(flash, layout, causal, NATIVE_CAUSAL=True),
                        **({"flash_mod": _flash_with(flash, layout, causal, NATIVE_CAUSAL=False)} if causal else {}),
                        "triton": lambda q, k, v: sparse_attention(q, k, v, layout, causal=causal),
                    }
                    if variants == "split":  # the block-exact baseline and Triton's, nothing else
                        impls = {n: impls[n] for n in ("flash", "triton")}
                    if tok is not None:  # the same kept blocks, 20% of them token-exact (half their bits)
                        impls["flash_tok20"] = _flash_with(flash, tok, causal, PARTIAL="mask_mod")
                        impls["flash_split_tok20"] = _flash_with(flash, tok, causal, PARTIAL="split")
                        impls["triton_tok20"] = lambda q, k, v: sparse_attention(q, k, v, tok, causal=causal)
                        if variants == "split":
                            impls.update(_split_parts(tok, L, causal))
                    for mode in ("fwd", "fwd+bwd"):
                        row = {"d": d, "L": L, "batch": B, "causal": causal, "density": dens, "mode": mode}
                        times = {name: [] for name in impls}
                        names = list(impls)
                        for r in range(rounds):  # interleaved, order rotated: a drift falls on all alike
                            for name in names[r % len(names):] + names[: r % len(names)]:
                                if name + "_error" in row:
                                    continue
                                try:
                                    times[name].append(evt(impls[name], mode, q, k, v))
                                except Exception as e:  # noqa: BLE001
                                    row[name + "_error"] = err_text(e)
                        for name, got in times.items():
                            if got and name + "_error" not in row:
                                row[name + "_ms"] = sorted(got)[len(got) // 2]
                                row[name + "_rounds"] = got  # (not "_ms": the ratios read every "*_ms" key)
                        _split_ratios(row)
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


def _flash_with(flash, layout, causal, **switches):
    """The flash backend with module switches set for the call, e.g. ``NATIVE_CAUSAL=False`` (mask_mod
    causality) or ``PARTIAL="split"`` (token-exact blocks through the split path)."""
    def f(q, k, v):
        before = {name: getattr(flash, name) for name in switches}
        for name, value in switches.items():
            setattr(flash, name, value)
        try:
            return flash.flash_sparse_attention(q, k, v, layout, causal=causal)
        finally:
            for name, value in before.items():
                setattr(flash, name, value)
    return f


def _split_parts(tok, L: int, causal: bool):
    """The split's parts alone on ``tok``'s split (``L`` x ``L``): FA4 on the full-only layout, Triton on the
    rest, and Triton on the same blocks as whole blocks (no bitmask), for what the bitmask costs it."""
    from attnprune.backends import _flash_split as fs
    from attnprune.kernels import BlockLayout, sparse_attention

    sp = fs.split_layout(tok, L, L, causal, 0)
    out = {}
    if sp.full is not None:  # its own split is FA4 alone (every block full)
        out["split_fa4_full"] = lambda q, k, v: fs.split_attention(q, k, v, sp.full, causal=causal, full="fa4")
    if sp.part is not None:  # its own split is Triton alone (no block full)
        p = sp.part
        nobits = BlockLayout(p.num_heads, p.q_blocks, p.k_blocks, p.block, p.row, p.col, torch.full_like(p.code, -1),
                             p.bits[:0], L, L)
        out["split_triton_part"] = lambda q, k, v: fs.split_attention(q, k, v, p, causal=causal)
        out["split_triton_part_nobits"] = lambda q, k, v: sparse_attention(q, k, v, nobits, causal=causal)
    return out


def _split_ratios(row):
    """Derived numbers of a token-exact row: split / mask_mod / parts against the block-exact ``flash``,
    the merge's time (split - its parts) and what the bitmask costs Triton (part / part without bits)."""
    g = {k[:-3]: v for k, v in row.items() if k.endswith("_ms")}
    if "flash" not in g:
        return
    for name, key in (("flash_split_tok20", "split_over_flash"), ("flash_tok20", "mod_over_flash")):
        if name in g:
            row[key] = round(g[name] / g["flash"], 3)
    if "split_fa4_full" in g and "split_triton_part" in g:
        row["parts_over_flash"] = round((g["split_fa4_full"] + g["split_triton_part"]) / g["flash"], 3)
        if "flash_split_tok20" in g:
            row["merge_ms"] = round(g["flash_split_tok20"] - g["split_fa4_full"] - g["split_triton_part"], 4)
    if "split_triton_part_nobits" in g and "split_triton_part" in g:
        row["triton_bits_cost"] = round(g["split_triton_part"] / g["split_triton_part_nobits"], 3)


def _cudnn(q, k, v, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)


def table(rows):
    names = ("cudnn", "fa4_direct", "flash", "flash_mod", "triton", "flash_tok20", "flash_split_tok20",
             "triton_tok20", "split_fa4_full", "split_triton_part", "split_triton_part_nobits")
    names = [n for n in names if any(n + "_ms" in r for r in rows)]
    extra = [x for x in ("split_over_flash", "mod_over_flash", "parts_over_flash", "triton_bits_cost")
             if any(x in r for r in rows)]
    lines = ["| d | L | causal | density | mode | " + " | ".join([n + " ms" for n in names] + extra) + " |",
             "|---|---|---|---|---|" + "---|" * (len(names) + len(extra))]
    for r in rows:
        if "mode" not in r:
            continue
        cells = [f"{r[n + '_ms']:.3f}" if n + "_ms" in r else "err" for n in names]
        cells += [f"{r[x]:.2f}" if x in r else "-" for x in extra]
        lines.append(f"| {r['d']} | {r['L']} | {r['causal']} | {r['density']} | {r['mode']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="fa4_check.json")
    ap.add_argument("--quick", action="store_true", help="L = 4096 only")
    ap.add_argument("--lengths", default=None, help="comma-separated lengths (default 4096,16384)")
    ap.add_argument("--budget", type=float, default=170.0, help="seconds for the timings (rows past it: skipped)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timings per implementation, median kept")
    ap.add_argument("--variants", choices=("all", "split"), default="all",
                    help="split: only the token-exact cases, mask_mod vs split and the split's parts (docstring)")
    a = ap.parse_args()
    res = {"torch": torch.__version__, "device": torch.cuda.get_device_name()}
    try:
        import flash_attn.cute as fc
        res["fa4"] = getattr(fc, "__version__", "?")
    except Exception as e:  # noqa: BLE001
        res["fa4_error"] = err_text(e)
    res["correctness"] = correctness(a.variants)
    try:
        lengths = [int(x) for x in a.lengths.split(",")] if a.lengths else ([4096] if a.quick else [4096, 16384])
        res["timings"] = timings(lengths, a.budget, a.variants, a.rounds)
    except Exception as e:  # noqa: BLE001
        res["timings_error"] = err_text(e)
        res["timings"] = []
    print(table(res["timings"]))
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    main()
