"""The masked model under ``torch.compile`` (issue 9): eager vs ``torch.compile(fullgraph=True)`` vs
``mode="reduce-overhead"`` (CUDA graphs through inductor), output agreement and time per forward.

SmolLM2 architecture (random weights, bf16, ``attnprune.bench.model.build_model``), prefill of ``--length``
tokens x ``--batch`` under ``no_grad`` without a KV cache and without an attention mask, as
``bench/overhead.py`` builds it: ``dense`` (SDPA, no mask attached), ``masked-90`` (the synthetic 90% block
mask of ``attnprune bench``) and ``masked-all`` (every attendable block kept), the masks through
``--backend`` (triton: its kernels as the custom ops ``attnprune::sparse_fwd`` under compile).

Per variant and mode: compile time (first call), median wall and host ms per forward (``_time`` of
``bench/overhead.py``), the logits' largest difference to the variant's eager logits (absolute and over
the largest eager logit) and the share of positions whose argmax token agrees; for reduce-overhead,
``torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]`` (non-zero: inductor did not use a graph);
``graphs``: the graphs dynamo compiled for the mode (over 1: it recompiled while timed). The eager row of
each variant runs first (a warm-up forward, as the capture path narrows its hooks on the first one).

    PYTHONPATH=src python3 bench/compile_check.py --out bench/results/compile_h200.json
    TRITON_INTERPRET=1 PYTHONPATH=src python3 bench/compile_check.py --device cpu   # smoke run (tiny, aot_eager)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings

if "cpu" in sys.argv:  # the smoke run: the Triton kernels under the interpreter (set before triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--backend", default="triton", help="attnprune backend of the masked variants")
    ap.add_argument("--arch", default=None, help="default: smollm2 (cuda), tiny-llama (cpu)")
    ap.add_argument("--length", type=int, default=None, help="default: 4096 (cuda), 64 (cpu)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--block", type=int, default=None, help="mask block, default: 128 (cuda), 16 (cpu)")
    ap.add_argument("--variants", default="dense,masked-90,masked-all")
    ap.add_argument("--modes", default=None,
                    help="comma list of eager, default (torch.compile's default mode), reduce-overhead; "
                         "default: all three (cuda), eager,default (cpu)")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend, default inductor "
                    "(cuda), aot_eager (cpu)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also profile N forwards of every variant and mode (torch.profiler): the top operations "
                         "by host time and by device time per forward, printed and stored in the row")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("bench/compile_check.py needs CUDA (or --device cpu for the smoke run)", file=sys.stderr)
        return 2
    arch = a.arch or ("smollm2" if cuda else "tiny-llama")
    length = a.length or (4096 if cuda else 64)
    block = a.block or (128 if cuda else 16)
    modes = (a.modes or ("eager,default,reduce-overhead" if cuda else "eager,default")).split(",")
    cbackend = a.compile_backend or ("inductor" if cuda else "aot_eager")
    dtype = torch.bfloat16 if cuda else torch.float32

    import attnprune
    from attnprune.bench.model import build_model, discover_sites, synthetic_mask
    from overhead import _time as timer
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dev = torch.device(a.device)
    model, cfg, _ = build_model(arch, length, dev, dtype)
    model.eval()
    infos = discover_sites(model, cfg.vocab_size, dev)
    ids = torch.randint(0, cfg.vocab_size, (a.batch, length), generator=torch.Generator().manual_seed(0)).to(dev)
    masks = {"dense": None, "masked-90": synthetic_mask(infos, length, 0.9, block, seed=0),
             "masked-all": synthetic_mask(infos, length, 0.0, block, seed=0)}

    def logits(m):
        with torch.no_grad():
            return m(input_ids=ids, use_cache=False).logits

    rows = []
    for variant in a.variants.split(","):
        mask = masks[variant]
        ctx = attnprune.apply(model, mask, backend=a.backend) if mask is not None else contextlib.nullcontext()
        with ctx, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = logits(model).float()
            for mode in modes:
                row = dict(variant=variant, mode=mode, backend="sdpa" if mask is None else a.backend)
                try:
                    if mode == "eager":
                        fn, row["compile_s"] = model, None
                    else:
                        torch._dynamo.reset()
                        torch._dynamo.utils.counters.clear()
                        fn = torch.compile(model, fullgraph=True, backend=cbackend,
                                           mode=None if mode == "default" else mode)
                        t0 = time.perf_counter()
                        logits(fn)
                        sync()
                        row["compile_s"] = time.perf_counter() - t0
                    out = logits(fn)
                    out = out.float()  # a copy: reduce-overhead's outputs are overwritten by the next replay
                    sync()
                    diff = (out - ref).abs().max().item()
                    row.update(max_abs_diff=diff, rel_diff=diff / max(ref.abs().max().item(), 1e-30),
                               argmax_agree=(out.argmax(-1) == ref.argmax(-1)).float().mean().item())
                    row["ms"], row["host_ms"] = timer(lambda: logits(fn), a.warmup, a.reps)
                    if mode != "eager":  # more than one: recompiled while timed (guards on per-call state)
                        row["graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
                    if mode == "reduce-overhead":
                        row["cudagraph_skips"] = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
                    if a.profile:
                        row["profile"] = _profile(lambda: logits(fn), a.profile, cuda)
                        print(f"top operations per forward, {variant} / {mode}:\n{_profile_table(row['profile'])}")
                except Exception as e:  # noqa: BLE001 - keep the other rows; the reason is the result
                    row["error"] = f"{type(e).__name__}: {e}"[:500]
                rows.append(row)
                print(json.dumps(row), flush=True)
        torch._dynamo.reset()

    def f(x, fmt=".2f"):
        return "n/a" if x is None else format(x, fmt)

    eager_ms = {r["variant"]: r.get("ms") for r in rows if r["mode"] == "eager"}
    print(f"\n{arch} {length} x {a.batch}, {dtype}, backend {a.backend}, torch.compile backend {cbackend}")
    print("| variant | mode | compile s | ms | host ms | vs eager | max abs diff | rel diff | argmax agree | graphs |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        e = eager_ms.get(r["variant"])
        speed = e / r["ms"] if e and r.get("ms") else None
        print(f"| {r['variant']} | {r['mode']} | {f(r.get('compile_s'), '.1f')} | {f(r.get('ms'))} | "
              f"{f(r.get('host_ms'))} | {f(speed, '.3f')} | {f(r.get('max_abs_diff'), '.3g')} | "
              f"{f(r.get('rel_diff'), '.3g')} | {f(r.get('argmax_agree'), '.4f')} | {r.get('graphs', '')} | "
              f"{r.get('error', '')}")
    if a.out:
        import transformers

        payload = dict(arch=arch, length=length, batch=a.batch, block=block, backend=a.backend,
                       compile_backend=cbackend, dtype=str(dtype), torch=torch.__version__,
                       transformers=transformers.__version__,
                       device=torch.cuda.get_device_name() if cuda else "cpu", rows=rows)
        try:
            import triton

            payload["triton"] = triton.__version__
        except ImportError:
            pass
        with open(a.out, "w") as fh:
            json.dump(payload, fh, indent=1)
    return 1 if any("error" in r for r in rows) else 0


def _profile(fn, n: int, cuda: bool, top: int = 12) -> dict:
    """Per forward: ``{"host": [...], "device": [...]}``, the ``top`` operations by self host time and by self
    device time over ``n`` calls of ``fn``, each ``[name, calls, host ms, device ms]`` divided by ``n``."""
    from train_profile import device_ms, profiled

    ev = profiled(fn, n, cuda)

    def rows(key):
        return [[e.key[:80], e.count / n, e.self_cpu_time_total / n / 1e3, device_ms(e) / n]
                for e in sorted(ev, key=key, reverse=True)[:top]]
    return {"host": rows(lambda e: e.self_cpu_time_total), "device": rows(device_ms)}


def _profile_table(p: dict) -> str:
    lines = ["| by | operation | calls | host ms | device ms |", "|---|---|---|---|---|"]
    for by in ("host", "device"):
        lines += [f"| {by} | {name} | {calls:g} | {h:.3f} | {d:.3f} |" for name, calls, h, d in p[by]]
    return "\n".join(lines)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # exit without interpreter teardown: on the GPU machine inductor's compile workers kept a finished run
    # alive past its time limit (2026-12-05)
    os._exit(code)
