"""Decode speed and memory: dense vs masked (stock cache) vs masked with PrunedKVCache, eager and as CUDA graphs.

SmolLM2-135M architecture (``attnprune bench --model smollm2``'s config, random weights, bf16), a
synthetic sink + band block mask (block 64: the first block column and a band of diagonal blocks, ~90% sparsity at 8k), greedy generation of
``--new`` tokens after a ``--context``-token prompt. Reports, per variant: prefill time, decode
tokens/s (batch x new tokens over the decode time: time of the whole generation minus the time of
a 1-token generation), peak GPU memory over the weights, and for PrunedKVCache the bytes it holds
against a dense cache's. Also checks that the PrunedKVCache tokens equal the stock cache's. The
measurement is the library's (:mod:`attnprune.bench.decode`, also ``attnprune bench --model smollm2
--model-modes decode``); this script runs it with one warm-up and one timed generation. Variants
(``--variants``, default all five): ``dense`` (SDPA, ``generate``), ``dense-graph`` (``StaticCache``,
``attnprune.decode_greedy`` replaying each step as a CUDA graph: the strongest dense baseline),
``masked``, ``pruned`` (``generate`` into ``PrunedKVCache``), ``pruned-graph`` (``decode_greedy`` into
``PrunedKVCache``, CUDA graph). A graph variant that fails records ``error`` in its row and the run goes
on. Graph rows: ``decode tok/s`` and ``step ms`` over the replayed steps (compactions included),
``graph`` holds the capture time and step counts.

    python bench/decode_bench.py --contexts 4096,8192 --batches 1,8 --new 64 -o decode.json

``--kernel-only``: the attention of one decode step alone (SmolLM2 shape: B=8, Hq=9, Hkv=3, D=64,
bf16, 8k context, a sink + band block mask keeping ~10%): ``masked_decode`` over the dense 8k cache
(mask looked up in the kernel) and over the compacted cache (the kept ~10% of slots), against SDPA
over the dense cache unmasked, and the pre-kernel path (``keep_at`` mask + SDPA with a bool mask +
``where``) over the compacted cache.

    python bench/decode_bench.py --kernel-only [--contexts 8192 --batches 8]

``--host`` (CPU): the host work of one decode step (one new token per sequence) with the same
model and mask (fp32, default 512 context x batch 2, left padding with ``--pad``): aten ops
dispatched per step, split into the cache update, the attention call (``_Patch._pruned`` apart
from the capture around it) and the rest of the model;
host syncs per step (``aten._local_scalar_dense`` and ``Tensor.tolist`` calls, plus ops of
data-dependent output size) and the median / mean wall time of a bare step, for transformers'
``DynamicCache`` (dense), ``PrunedKVCache`` on the CPU path (SDPA with the keep mask) and
``PrunedKVCache`` on the CUDA path (``masked_decode``, its kernel launch replaced by a no-op: the
host work a GPU step spends around the kernel).

    python bench/decode_bench.py --host [--contexts 512 --batches 2 --steps 64 --pad 0]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch


def band_mask(model, length: int, block: int, sparsity: float):
    """Sink block column + a band of diagonal blocks, wide enough for ~``sparsity``
    (:func:`attnprune.bench.decode.band_mask` over ``model``'s sites); returns (mask, achieved sparsity)."""
    from attnprune.bench import decode
    from attnprune.bench.model import discover_sites

    infos = discover_sites(model, model.config.vocab_size, next(model.parameters()).device)
    return decode.band_mask(infos, length, block, sparsity)


def run(contexts, batches, new: int, backend: str, block: int, sparsity: float, device: str = "cuda",
        variants=None):
    """Rows (dicts) of :func:`attnprune.bench.decode.run` for SmolLM2 in bf16, one warm-up and one timed
    generation of each length per variant (``variants``: default all of ``decode.ALL_VARIANTS``)."""
    from dataclasses import asdict

    from attnprune.bench import decode

    rows = decode.run("smollm2", contexts, [sparsity], batches=batches, new_tokens=new, backend=backend,
                      block=block, warmup=1, reps=1, device=device, dtype=torch.bfloat16,
                      log=lambda line: print(line, flush=True),  # a line per row as it is measured
                      variants=list(variants or decode.ALL_VARIANTS))
    rows = [asdict(r) for r in rows]
    for r in rows:
        print(json.dumps(r), flush=True)
    return rows


def kernel_only(contexts, batches, block: int, sparsity: float, device: str = "cuda"):
    """Per-step attention time (ms, CUDA events, median of 200) of the decode variants above."""
    import torch.nn.functional as F

    from attnprune.kernels.decode import masked_decode

    dev = torch.device(device)
    Hq, Hkv, D, dt = 9, 3, 64, torch.bfloat16
    rows = []
    for L in contexts:
        nb = -(-L // block)
        i, j = torch.arange(nb)[:, None], torch.arange(nb)[None, :]
        width = max(1, round((1 - sparsity) * nb / 2))
        keep_b = (((j == 0) | ((i - j >= 0) & (i - j < width))) & (j <= i)).expand(Hq, nb, nb).contiguous()
        keep = keep_b.to(dev, torch.uint8)
        qpos = L - 1
        kept_pos = torch.arange(L)[keep_b[0, qpos // block].repeat_interleave(block)[:L]]  # what row L-1 reads
        for B in batches:
            g = torch.Generator(dev).manual_seed(0)
            q = torch.randn(B, Hq, 1, D, device=dev, dtype=dt, generator=g)
            k = torch.randn(B, Hkv, L, D, device=dev, dtype=dt, generator=g)
            v = torch.randn(B, Hkv, L, D, device=dev, dtype=dt, generator=g)
            pos = torch.arange(L, device=dev).expand(B, Hkv, L).contiguous()
            q_pos = torch.full((1, 1), qpos, device=dev, dtype=torch.long)
            kc, vc = k[:, :, kept_pos.to(dev)].contiguous(), v[:, :, kept_pos.to(dev)].contiguous()
            pc = kept_pos.to(dev).expand(B, Hkv, -1).contiguous()

            def old_path():  # what _Patch._pruned did before the kernel, over the compacted cache
                kp = pc.repeat_interleave(Hq // Hkv, dim=1)[:, :, None, :]
                qi = q_pos[:, None, :, None]
                kb = keep.bool()[torch.arange(Hq, device=dev)[None, :, None, None], qi // block, kp // block]
                allowed = kb & (kp >= 0) & (kp <= qi)
                out = F.scaled_dot_product_attention(q, kc, vc, attn_mask=allowed, enable_gqa=True)
                return torch.where(allowed.any(-1, keepdim=True), out, 0.0)

            variants = {
                "sdpa_dense_unmasked": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                "masked_decode_dense_cache": lambda: masked_decode(q, k, v, pos, q_pos, keep, block),
                "masked_decode_compacted": lambda: masked_decode(q, kc, vc, pc, q_pos, keep, block),
                "old_path_compacted": old_path,
            }
            for name, fn in variants.items():
                for _ in range(10):
                    fn()
                torch.cuda.synchronize()
                times = []
                for _ in range(200):
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    fn()
                    b.record()
                    times.append((a, b))
                torch.cuda.synchronize()
                ms = sorted(x.elapsed_time(y) for x, y in times)[len(times) // 2]
                t0 = time.perf_counter()
                for _ in range(100):
                    fn()
                host_us = (time.perf_counter() - t0) / 100 * 1e6  # launch cost (not synchronised)
                torch.cuda.synchronize()
                row = {"context": L, "batch": B, "variant": name, "gpu_ms": ms, "host_us_per_call": host_us,
                       "kept_slots": int(len(kept_pos)) if "compacted" in name else L}
                rows.append(row)
                print(json.dumps(row), flush=True)
            ref = F.scaled_dot_product_attention(q.float(), kc.float(), vc.float(), enable_gqa=True)
            err = (masked_decode(q, k, v, pos, q_pos, keep, block).float() - ref).abs().max().item()
            print(json.dumps({"context": L, "batch": B, "max_abs_err_vs_fp32_sdpa_on_kept": err}), flush=True)
    return rows


SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_consecutive"}


def host_profile(context: int = 512, batch: int = 2, steps: int = 64, pad: int = 0, block: int = 64,
                 sparsity: float = 0.9, variants=("dense", "pruned_cpu", "pruned_cuda_path")):
    """Per decode step on the CPU: aten ops by region (cache update / attention call / rest), host
    syncs by region, wall ms (median and mean over ``steps`` steps; compactions included in the mean)."""
    import statistics
    import sys
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer
    from transformers.modeling_utils import AttentionInterface

    import attnprune
    from attnprune import PrunedKVCache
    from attnprune.bench.model import build_model
    from attnprune.cache import PrunedLayer
    from attnprune.kernels import decode

    patch_cls = sys.modules["attnprune.apply"]._Patch  # (``attnprune.apply`` is also a function)

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.region, self.ops, self.syncs, self.sites = ["model"], Counter(), Counter(), Counter()
            self.names = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[self.region[-1]] += 1
            self.names[f"{self.region[-1]}:{func.overloadpacket.__name__}"] += 1
            if func.overloadpacket.__name__ in SYNC_OPS:
                self.syncs[self.region[-1]] += 1
                self.sites[_caller()] += 1
            return func(*args, **(kwargs or {}))

    counter: list = [None]
    spent = Counter()  # seconds in each region (the timed pass)

    def region(name, fn):
        def wrapped(*a, **k):
            c = counter[0]
            if c is None:
                t0 = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    spent[name] += time.perf_counter() - t0
            c.region.append(name)
            try:
                return fn(*a, **k)
            finally:
                c.region.pop()
        return wrapped

    real_tolist = torch.Tensor.tolist

    def tolist(t):
        if counter[0] is not None:
            counter[0].syncs[counter[0].region[-1]] += 1
            counter[0].sites[_caller()] += 1
        return real_tolist(t)

    class NoLaunch:  # masked_decode's launch replaced: what remains is its host work
        def __getitem__(self, grid):
            return lambda *a, **k: None

    torch.manual_seed(0)
    torch.set_num_threads(1)  # steadier timings on a shared CPU
    model = build_model("smollm2", context + steps + 24, torch.device("cpu"), torch.float32)[0].eval()
    mask, achieved = band_mask(model, context + steps + 16, block, sparsity)
    ids = torch.randint(3, 49152, (batch, context), generator=torch.Generator().manual_seed(1))
    am = torch.ones(batch, context, dtype=torch.long)
    am[0, :pad] = 0
    mapping = AttentionInterface._global_mapping
    rows = []
    for variant in variants:
        with contextlib.ExitStack() as st:
            saved = {k: mapping[k] for k in ("sdpa", "attnprune") if k in mapping}
            st.callback(mapping.update, saved)
            for cls, name, region_name in ((PrunedLayer, "update", "cache"), (DynamicLayer, "update", "cache"),
                                           (patch_cls, "_pruned", "pruned")):  # "pruned": within "attention"
                st.callback(setattr, cls, name, getattr(cls, name))
                setattr(cls, name, region(region_name, getattr(cls, name)))
            st.callback(setattr, torch.Tensor, "tolist", real_tolist)
            torch.Tensor.tolist = tolist
            if variant == "pruned_cuda_path":
                st.callback(setattr, decode, "FORCE", decode.FORCE)
                st.callback(setattr, decode, "_decode_kernel", decode._decode_kernel)
                decode.FORCE, decode._decode_kernel = True, NoLaunch()
            if variant != "dense":
                st.enter_context(attnprune.apply(model, mask, backend="reference"))
            for k in list(saved) + (["attnprune"] if "attnprune" not in saved and "attnprune" in mapping else []):
                mapping[k] = region("attention", mapping[k])
            st.enter_context(torch.no_grad())
            per = {"ops": [], "syncs": [], "ms": [], "region_ms": []}
            sites = Counter()
            for counting in (False, True):
                cache = DynamicCache(config=model.config) if variant == "dense" else PrunedKVCache(model, mask)
                m = am.clone()
                out = model(input_ids=ids, attention_mask=m, past_key_values=cache, use_cache=True, logits_to_keep=1)
                for _ in range(steps):
                    nxt = out.logits[:, -1:].argmax(-1).clamp(0, 49151)
                    m = torch.cat([m, m.new_ones(batch, 1)], 1)
                    c = counter[0] = Count() if counting else None
                    spent.clear()
                    t0 = time.perf_counter()
                    with c if c is not None else contextlib.nullcontext():
                        out = model(input_ids=nxt, attention_mask=m, past_key_values=cache, use_cache=True)
                    dt = time.perf_counter() - t0
                    counter[0] = None
                    if counting:
                        per["ops"].append(dict(c.ops))
                        per["syncs"].append(dict(c.syncs))
                        if len(per["ops"]) > 1:  # the steps after the first, as the counts below
                            sites.update(c.sites)
                        names = dict(c.names)  # the last step's ops by name
                    else:
                        per["ms"].append(1e3 * dt)
                        per["region_ms"].append({k: 1e3 * v for k, v in spent.items()})
        def stat(fn, key, regions=("cache", "pruned", "attention", "model")):  # over the steps after the first (which
            return {r: fn(x.get(r, 0) for x in per[key][1:]) for r in regions}  # compacts the prompt)

        row = {"variant": variant, "context": context, "batch": batch, "pad": pad, "steps": steps,
               "sparsity": achieved, "ops_median": stat(statistics.median, "ops"),
               "ops_mean": stat(statistics.mean, "ops"), "syncs_total": stat(sum, "syncs"),
               "sync_sites": dict(sites),
               "last_step_ops": {k: v for k, v in sorted(names.items()) if not k.startswith("model:")},
               "step_ms_median": statistics.median(per["ms"][1:]), "step_ms_mean": statistics.mean(per["ms"][1:]),
               "region_ms_median": stat(statistics.median, "region_ms", ("cache", "pruned", "attention")),
               "region_ms_mean": stat(statistics.mean, "region_ms", ("cache", "pruned", "attention"))}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _caller() -> str:
    """file:line of the innermost frame outside torch and this file (where a sync came from)."""
    import sys

    f = sys._getframe(2)
    while f is not None and ("/torch/" in f.f_code.co_filename or f.f_code.co_filename == __file__):
        f = f.f_back
    return "?" if f is None else f"{f.f_code.co_filename.split('site-packages/')[-1].split('src/')[-1]}:{f.f_lineno}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="4096,8192")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--kernel-only", action="store_true", help="time the decode attention alone (see above)")
    ap.add_argument("--host", action="store_true", help="CPU: ops, syncs and wall time of one decode step")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--pad", type=int, default=0, help="--host: left padding of the first sequence")
    ap.add_argument("--variants", default="dense,dense-graph,masked,pruned,pruned-graph",
                    help="decode variants, comma-separated (see above)")
    ap.add_argument("-o", "--out", default=None)
    a = ap.parse_args()
    from attnprune._io import write_json
    from attnprune.report import environment

    if a.host:
        ctx = int(a.contexts) if a.contexts != "4096,8192" else 512
        B = int(a.batches) if a.batches != "1,8" else 2
        rows = host_profile(ctx, B, a.steps, a.pad, a.block, a.sparsity)
        print(f"{'variant':>17} {'cache ops':>9} {'_pruned ops':>11} {'other attn ops':>14} {'model ops':>9} "
              f"{'syncs/step':>10} {'cache ms':>8} {'_pruned ms':>10} {'attn ms':>7} {'step ms':>7}")
        for r in rows:
            o, t = r["ops_median"], r["region_ms_median"]
            print(f"{r['variant']:>17} {o['cache']:>9.0f} {o['pruned']:>11.0f} {o['attention']:>14.0f} "
                  f"{o['model']:>9.0f} {sum(r['syncs_total'].values()) / (r['steps'] - 1):>10.2f} "
                  f"{t['cache']:>8.2f} {t['pruned']:>10.2f} {t['attention']:>7.2f} {r['step_ms_median']:>7.2f}")
        print("(medians over the steps after the first; syncs: mean per step, all regions; _pruned ms is part of "
              "attn ms, _pruned ops are not part of other attn ops)")
        if a.out:
            write_json(a.out, {"environment": environment("cpu"), "command": "bench/decode_bench.py --host",
                               "rows": rows})
        return

    if a.kernel_only:
        ctxs = [int(x) for x in a.contexts.split(",")] if a.contexts != "4096,8192" else [8192]
        bs = [int(x) for x in a.batches.split(",")] if a.batches != "1,8" else [8]
        rows = kernel_only(ctxs, bs, a.block, a.sparsity, a.device)
        if a.out:
            write_json(a.out, {"environment": environment(a.device), "command": "bench/decode_bench.py --kernel-only",
                               "rows": rows})
        return

    rows = run([int(x) for x in a.contexts.split(",")], [int(x) for x in a.batches.split(",")], a.new,
               a.backend, a.block, a.sparsity, a.device, a.variants.split(","))
    def f(x, spec):  # "-" for None, in the column's width
        return format("-", spec.split(".")[0]) if x is None else format(x, spec)

    print(f"{'ctx':>6} {'B':>3} {'variant':>12} {'prefill ms':>10} {'decode tok/s':>12} {'step ms':>8} {'peak MiB':>9} "
          f"{'KV share':>8} {'steady MiB':>10} {'same tokens':>11}")
    for r in rows:
        same_as = r["same_tokens_as_masked"] if r["same_tokens_as_masked"] is not None else r["same_tokens_as_dense"]
        same = "" if same_as is None else str(same_as)
        err = f" ERROR: {r['error']}" if r["error"] else ""
        print(f"{r['context']:>6} {r['batch']:>3} {r['variant']:>12} {f(r['prefill_ms'], '>10.1f')} "
              f"{f(r['decode_tok_s'], '>12.1f')} {f(r['bare_step_ms'], '>8.2f')} "
              f"{f(r['peak_mib_over_weights'], '>9.0f')} {f(r['kv_share'], '>8.3f')} "
              f"{f(r['steady_mib_over_weights'], '>10.0f')} {same:>11} {r['note']}{err}")
    by = {(r["context"], r["batch"], r["variant"]): r for r in rows if r["mask"] in (None, "sink+band")}
    for (ctx, B, v), r in sorted(by.items()):  # issue 13's target: pruned vs dense tokens/s
        if v in ("pruned", "pruned-graph"):
            for base in ("dense", "dense-graph"):
                d = by.get((ctx, B, base))
                if d and d["decode_tok_s"] and r["decode_tok_s"]:
                    print(f"ctx={ctx} B={B}: {v} / {base} tokens/s = {r['decode_tok_s'] / d['decode_tok_s']:.2f}")
    if a.out:
        write_json(a.out, {"environment": environment(a.device), "command": "bench/decode_bench.py", "rows": rows})


if __name__ == "__main__":
    main()
