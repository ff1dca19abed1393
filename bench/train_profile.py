"""Where a whole-model training step's time goes (issue 9): the device time per step of every kernel, for the
dense model (SDPA), the masked model (``--backend``, a synthetic block mask of ``--sparsity``) and the
no-attention stand-in of ``attnprune bench --model``, grouped into attention kernels and the rest.

The question it answers: at 16k x 4 (SmolLM2 architecture, bf16) the masked training step is ~70 ms above the
no-attention bound where the kernel benchmark's rows predict ~38 ms (BENCHMARKS.md, 2026-12-05). Is the extra
in the attention kernels (grouped-query backward, a slower configuration), in copies around them, or in the
stand-in's own shortcuts (it gives q and k no gradient, so their projections' backward is skipped)?

    PYTHONPATH=src python3 bench/train_profile.py --backend flash --out train_profile.json    # GPU
    TRITON_INTERPRET=1 PYTHONPATH=src python3 bench/train_profile.py --device cpu              # smoke run (tiny)

Per variant: median step ms over ``--reps`` timed steps (``attnprune.bench.model``'s timing), then a
``torch.profiler`` trace of ``--profile`` steps: ``kernels`` (top ``--top`` by device time per step: name, calls,
ms), ``attention_ms`` / ``other_ms`` (device time per step of kernels whose names match ``ATTENTION`` / the rest).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys

if "cpu" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

# kernel names of attention: SDPA's flash / cuDNN / efficient kernels, FA4 (CuTe: flash_fwd / flash_bwd ...),
# the project's Triton kernels (_attn_fwd / _attn_bwd ..., sparse_*) and FlexAttention's
ATTENTION = re.compile(r"flash|fmha|cudnn|attn|attention|sparse_|_fwd_kernel|_bwd_kernel|sdpa", re.IGNORECASE)


def device_ms(e) -> float:
    """Self device time (ms) of a profiler event average (the attribute's name differs between torch versions)."""
    return getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)) / 1e3


def profiled(fn, n: int, cuda: bool):
    """``torch.profiler`` event averages of ``n`` calls of ``fn`` (host, and device where ``cuda``)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(n):
            fn()
        if cuda:
            torch.cuda.synchronize()
    return prof.key_averages()


def profile_step(step, n: int, cuda: bool, top: int) -> dict:
    """Device time per step of ``step()`` over ``n`` profiled calls, by kernel."""
    # on the GPU the kernels are the device events; on the CPU (smoke run) the aten ops' host time stands in
    events = [e for e in profiled(step, n, cuda) if (device_ms(e) > 0 if cuda else e.key.startswith("aten::"))]
    ms = {e.key: (device_ms(e) if cuda else e.self_cpu_time_total / 1e3) / n for e in events}
    calls = {e.key: e.count / n for e in events}
    att = sum(v for k, v in ms.items() if ATTENTION.search(k))
    ranked = sorted(ms, key=ms.get, reverse=True)[:top]
    return {"kernels": [[k[:120], calls[k], ms[k]] for k in ranked], "attention_ms": att,
            "other_ms": sum(ms.values()) - att, "timed_on": "device" if cuda else "host (aten ops)"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--backend", default="triton", help="attnprune backend of the masked variant")
    ap.add_argument("--arch", default=None, help="default: smollm2 (cuda), tiny-llama (cpu)")
    ap.add_argument("--length", type=int, default=None, help="default: 16384 (cuda), 64 (cpu)")
    ap.add_argument("--batch", type=int, default=None, help="default: 4 (cuda), 1 (cpu)")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--block", type=int, default=None, help="mask block, default: 128 (cuda), 16 (cpu)")
    ap.add_argument("--variants", default="dense,masked,no-attention")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--profile", type=int, default=2, help="profiled steps per variant")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("bench/train_profile.py needs CUDA (or --device cpu for the smoke run)", file=sys.stderr)
        return 2
    import attnprune
    from attnprune.bench.model import _measure, _no_attention, _runners, build_model, discover_sites, synthetic_mask
    from attnprune.capture import intercept
    from attnprune.environment import environment

    arch, length = a.arch or ("smollm2" if cuda else "tiny-llama"), a.length or (16384 if cuda else 64)
    batch, block = a.batch or (4 if cuda else 1), a.block or (128 if cuda else 16)
    dev = torch.device(a.device)
    model, cfg, kind = build_model(arch, length, dev, torch.bfloat16 if cuda else torch.float32)
    model.eval()
    infos = discover_sites(model, cfg.vocab_size, dev)
    mask = synthetic_mask(infos, length, a.sparsity, block, seed=length)
    ids = torch.randint(0, cfg.vocab_size, (batch, length), generator=torch.Generator().manual_seed(length)).to(dev)
    step = _runners(model, ids, kind)[0]["train"]
    contexts = {"dense": contextlib.nullcontext, "masked": lambda: attnprune.apply(model, mask, backend=a.backend),
                "no-attention": lambda: intercept(model, _no_attention)}
    rows = []
    for variant in a.variants.split(","):
        with contexts[variant]():
            ms, peak = _measure(step, dev, a.warmup, a.reps)
            row = dict(variant=variant, ms=ms, peak_mib=peak, **profile_step(step, a.profile, cuda, a.top))
        rows.append(row)
        print(f"\n{variant}: {ms:.2f} ms per step, attention kernels {row['attention_ms']:.2f} ms, "
              f"the rest {row['other_ms']:.2f} ms ({row['timed_on']})")
        for name, calls, kms in row["kernels"]:
            print(f"  {kms:9.3f} ms  {calls:6g}x  {name}")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(dict(env=environment(), arch=arch, length=length, batch=batch, block=block, backend=a.backend,
                           sparsity=a.sparsity, achieved=float(mask.sparsity), rows=rows), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
