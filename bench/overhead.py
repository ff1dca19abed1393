"""Host overhead of the masked model (issue 9): what attnprune adds per forward and per attention call.

SmolLM2 architecture (random weights, bf16, built by ``attnprune.bench.model``), prefill of
``--length`` tokens x ``--batch`` under ``no_grad`` without a KV cache. Variants:

* ``dense``: the model as built (SDPA);
* ``no-attention``: every attention call replaced through the capture path by a stand-in of (almost)
  no cost (``attnprune.bench.model._no_attention``): the capture path's own overhead;
* ``masked-all``: a block mask keeping every attendable block, through ``--backend``: the kernel does
  dense causal work, so ``(masked-all - dense) / calls`` is the overhead per attention call;
* ``masked-90``: a 90% block mask (the synthetic AP-style mask of ``attnprune bench``).

Each variant runs with the attention masks of ``--pads`` (``none``: no ``attention_mask``; ``ones``: a
2-D all-ones mask; ``right``: the last ``--pad`` tokens of sequence 0 padded). For each: median
synchronised wall time over ``--reps``, host time (the forward's wall time without the final
synchronisation: what the host spends launching it), and the GPU->CPU synchronisations of one
forward (``torch.cuda.set_sync_debug_mode("warn")``, warnings counted). With ``--cuda-graph`` each
variant is also captured as one CUDA graph (after warm-up forwards on a side stream) and its replay
timed (``graph_ms``): the forward without Python/launch overhead, i.e. what the GPU work costs; a
capture that fails (a host sync or allocation the graph cannot hold) records ``graph_error``.

    PYTHONPATH=src python3 bench/overhead.py --out overhead.json            # triton backend
    PYTHONPATH=src python3 bench/overhead.py --backend flash --out o.json
    PYTHONPATH=src python3 bench/overhead.py --pads none --cuda-graph --out og.json   # + graph replays
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import warnings

import torch


def _time(fn, warmup: int, reps: int) -> tuple[float, float]:
    """Median (wall ms, host ms) of ``fn`` over ``reps`` calls; on the CPU the two are the same."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    wall, host = [], []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        sync()
        t2 = time.perf_counter()
        host.append((t1 - t0) * 1e3)
        wall.append((t2 - t0) * 1e3)
    return statistics.median(wall), statistics.median(host)


def _graphed(fn):
    """``fn`` captured as one CUDA graph (two warm-up calls on a side stream first); returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--arch", default="smollm2")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--pads", default="none,ones,right")
    ap.add_argument("--pad", type=int, default=64, help="padded tokens of sequence 0 for --pads right")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--cuda-graph", action="store_true", help="also time each variant replayed as a CUDA graph")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/overhead.py needs CUDA", file=sys.stderr)
        return 2

    import attnprune
    from attnprune.bench.model import _no_attention, build_model, discover_sites, synthetic_mask
    from attnprune.bench.syncs import count_syncs
    from attnprune.capture import intercept
    from attnprune.backends import BACKENDS

    dev = torch.device("cuda")
    BACKENDS.get(a.backend)
    model, cfg, kind = build_model(a.arch, a.length, dev, torch.bfloat16)
    model.eval()
    infos = discover_sites(model, cfg.vocab_size, dev)
    n_calls = len(infos)
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.length), generator=torch.Generator().manual_seed(0)).to(dev)
    masks = {"masked-all": synthetic_mask(infos, a.length, 0.0, a.block, seed=0),
             "masked-90": synthetic_mask(infos, a.length, 0.9, a.block, seed=0)}
    variants = [("dense", None), ("no-attention", lambda: intercept(model, _no_attention))]
    variants += [(name, (lambda mk=mk: attnprune.apply(model, mk, backend=a.backend))) for name, mk in masks.items()]

    rows = []
    for pad in a.pads.split(","):
        am = None
        if pad == "ones":
            am = torch.ones(a.batch, a.length, dtype=torch.long, device=dev)
        elif pad == "right":
            am = torch.ones(a.batch, a.length, dtype=torch.long, device=dev)
            am[0, a.length - a.pad:] = 0
        elif pad != "none":
            raise SystemExit(f"unknown pad {pad!r}")

        def fwd(am=am):
            with torch.no_grad():
                model(input_ids=ids, attention_mask=am, use_cache=False)

        for name, ctx in variants:
            note, graph_ms, graph_error = "", None, None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # fallback notices: recorded below through the sync count
                try:
                    with (ctx() if ctx is not None else contextlib.nullcontext()):
                        ms, host = _time(fwd, a.warmup, a.reps)
                        n_sync, where = count_syncs(fwd)
                        if a.cuda_graph:
                            try:
                                graph_ms = _time(_graphed(fwd), a.warmup, a.reps)[0]
                            except Exception as e:  # noqa: BLE001 - the reason is the measurement
                                graph_error = f"{type(e).__name__}: {e}"[:300]
                except Exception as e:  # keep the other rows
                    ms = host = None
                    n_sync, where, note = None, [], f"{type(e).__name__}: {e}"[:300]
            rows.append(dict(pad=pad, variant=name, backend="sdpa" if ctx is None else
                             ("none" if name == "no-attention" else a.backend), ms=ms, host_ms=host,
                             syncs=n_sync, sync_sites=where[:20], note=note, graph_ms=graph_ms,
                             graph_error=graph_error))
            print(f"{pad:5s} {name:12s} ms={ms} host_ms={host} syncs={n_sync} graph_ms={graph_ms} "
                  f"{graph_error or ''} {note}", flush=True)
        base = {r["variant"]: r for r in rows if r["pad"] == pad}
        d = base["dense"]["ms"]
        for r in rows:
            if r["pad"] == pad and r["ms"] is not None and d is not None:
                r["minus_dense_ms"] = r["ms"] - d
                r["per_call_us"] = 1e3 * (r["ms"] - d) / n_calls
                r["speedup_vs_dense"] = d / r["ms"]
            dg = base["dense"].get("graph_ms")
            if r["pad"] == pad and r.get("graph_ms") and dg:
                r["graph_speedup_vs_dense_graph"] = dg / r["graph_ms"]

    print(f"\n{a.arch} {a.length} x {a.batch}, bf16, backend {a.backend}, {n_calls} attention calls per forward")
    print("| pad | variant | ms | host ms | - dense ms | per call us | syncs | vs dense | graph ms | graph vs dense graph |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    f = lambda x, nd=2: "n/a" if x is None else f"{x:.{nd}f}"  # noqa: E731
    for r in rows:
        print(f"| {r['pad']} | {r['variant']} | {f(r['ms'])} | {f(r['host_ms'])} | {f(r.get('minus_dense_ms'))} "
              f"| {f(r.get('per_call_us'), 1)} | {r['syncs']} | {f(r.get('speedup_vs_dense'), 3)} "
              f"| {f(r.get('graph_ms'))} | {f(r.get('graph_speedup_vs_dense_graph'), 3)} |")
    for r in rows:
        if r["syncs"] and r["variant"] != "dense":
            print(f"syncs {r['pad']}/{r['variant']}: {', '.join(r['sync_sites'])}")
    if a.out:
        payload = dict(arch=a.arch, length=a.length, batch=a.batch, block=a.block, backend=a.backend,
                       n_calls=n_calls, torch=torch.__version__, device=torch.cuda.get_device_name(),
                       rows=rows)
        try:
            import transformers
            import triton

            payload.update(transformers=transformers.__version__, triton=triton.__version__)
        except ImportError:
            pass
        with open(a.out, "w") as fh:
            json.dump(payload, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
