"""Host time of one masked attention call on the GPU, layer by layer (issue 9: where the eager overhead goes).

    PYTHONPATH=src python3 bench/launch_overhead.py [--out launch.json]

SmolLM2's attention shape (9 query / 3 kv heads, d=64, bf16), causal, one sequence, at ``--length``
(default 256: the GPU work per call is a few microseconds, so back-to-back calls measure the host).
Each variant runs ``--calls`` times in a loop without synchronising; the host time per call is the
loop's wall time / calls (the GPU keeps up, checked by the synchronised total). Variants, from the
outermost:

* ``sdpa``: ``F.scaled_dot_product_attention(is_causal=True)`` (what dense pays per call);
* ``backend``: the triton backend (``BACKENDS.get("triton")``) on a site mask (what ``apply`` calls);
* ``sparse_attention``: the kernel entry point on a ready layout;
* ``autograd_apply``: ``_SparseAttention.apply`` with its arguments prepared (plan, strides, padding);
* ``launch``: the recorded ``_fwd_kernel[grid](...)`` call alone (Triton's binder + launcher);
* ``tma_descriptors``: building the two TMA descriptors the forward makes per call;
* ``empty3``: the three small allocations of a forward call (o, lse, a 1-element placeholder).

``--profile-model``: then cProfile over 5 eager forwards of the SmolLM2 architecture (random weights,
bf16, ``--model-length`` tokens, an all-kept 128-block mask through the triton backend), the top
functions by own time: where the host time of a whole forward goes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _per_call_us(fn, calls: int) -> tuple[float, float]:
    for _ in range(min(20, calls)):
        fn()
    _sync()
    best_host, best_wall = float("inf"), float("inf")
    for _ in range(5 if calls > 5 else 1):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        _sync()
        t2 = time.perf_counter()
        best_host, best_wall = min(best_host, (t1 - t0) / calls * 1e6), min(best_wall, (t2 - t0) / calls * 1e6)
    return best_host, best_wall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile-model", action="store_true")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script under TRITON_INTERPRET=1")
    ap.add_argument("--model-length", type=int, default=4096)
    args = ap.parse_args(argv)
    import attnprune  # noqa: F401 - registers the backends
    from attnprune.backends import BACKENDS
    from attnprune.bench.model import synthetic_mask
    from attnprune.kernels import attention as kattn
    from attnprune.sites import SiteInfo

    dev, L = torch.device(args.device), args.length
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, 9, L, 64, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, 3, L, 64, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, 3, L, 64, device=dev, dtype=torch.bfloat16, generator=g)
    info = SiteInfo("model.layers.0.self_attn", "causal", 9, 3)
    mask = synthetic_mask({info.name: info}, L, 0.0, 128)
    sm = mask.site(info.name)
    layout = sm.layout(L, L, (128, 128), device=dev)
    tri = BACKENDS.get("triton")

    rows = {}

    def run(name, fn):
        host, wall = _per_call_us(fn, args.calls)
        rows[name] = {"host_us": round(host, 1), "wall_us": round(wall, 1)}
        print(f"{name:18s} host {host:7.1f} us/call   wall {wall:7.1f} us/call", flush=True)

    with torch.no_grad():
        run("sdpa", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        run("backend", lambda: tri(q, k, v, sm, is_causal=True))
        run("sparse_attention", lambda: kattn.sparse_attention(q, k, v, layout, causal=True))
        plan = layout.plan(L, L, True, 0)
        run("autograd_apply", lambda: kattn._SparseAttention.apply(q, k, v, None, layout, plan, 0.125, True, 0, {},
                                                                    None))
        rec = {}
        real = kattn._kernels()

        class _Rec:
            def __init__(self, kern):
                self.kern = kern

            def __getitem__(self, grid):
                def call(*a, **kw):
                    rec.setdefault("fwd", (self.kern, grid, a, kw))
                    return self.kern[grid](*a, **kw)
                return call

        import types
        kattn._kernels = lambda: types.SimpleNamespace(_fwd_kernel=_Rec(real._fwd_kernel))
        kattn.sparse_attention(q, k, v, layout, causal=True)
        kattn._kernels = lambda: real
        kern, grid, a, kw = rec["fwd"]
        run("launch", lambda: kern[grid](*a, **kw))
        try:
            from triton.tools.tensor_descriptor import TensorDescriptor

            kf, vf = k.view(-1, 64), v.view(-1, 64)
            run("tma_descriptors", lambda: (TensorDescriptor.from_tensor(kf, [128, 64]),
                                            TensorDescriptor.from_tensor(vf, [128, 64])))
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            rows["tma_descriptors"] = {"error": repr(e)}
        run("empty3", lambda: (torch.empty(1, 9, L, 64, dtype=q.dtype, device=dev),
                               torch.empty(1, 9, L, dtype=torch.float32, device=dev),
                               torch.empty(1, dtype=torch.int8, device=dev)))
    if args.profile_model:
        _profile_model(args.model_length)
    import triton
    out = {"length": L, "calls": args.calls, "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "triton": triton.__version__, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


def _profile_model(L: int) -> None:
    import cProfile
    import pstats

    import attnprune
    from attnprune.bench.model import build_model, discover_sites, synthetic_mask

    dev = torch.device("cuda")
    model, cfg, _ = build_model("smollm2", L, dev, torch.bfloat16)
    model.eval()
    mask = synthetic_mask(discover_sites(model, cfg.vocab_size, dev), L, 0.0, 128)
    ids = torch.randint(0, cfg.vocab_size, (1, L), device=dev)
    with torch.no_grad(), attnprune.apply(model, mask, backend="triton"):
        for _ in range(3):
            model(input_ids=ids, use_cache=False)
        torch.cuda.synchronize()
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(5):
            model(input_ids=ids, use_cache=False)
        pr.disable()
        torch.cuda.synchronize()
    st = pstats.Stats(pr)
    st.sort_stats("tottime").print_stats(30)
    st.sort_stats("cumtime").print_stats("attnprune|triton", 30)


if __name__ == "__main__":
    sys.exit(main())
