"""Time BlockLayout construction (from block flags) and plan building for a 32k layout.

    PYTHONPATH=src python bench/layout_time.py [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import torch

from attnprune.kernels import BlockLayout


def timed(fn, device, reps=20):
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--density", type=float, default=0.1)
    a = ap.parse_args()
    dev = torch.device(a.device)
    nb = -(-a.length // a.block)
    g = torch.Generator(device="cpu").manual_seed(0)
    keep = (torch.rand(a.heads, nb, nb, generator=g) < a.density).to(dev)
    ms_layout, lay = timed(lambda: BlockLayout.from_blocks(keep, block=(a.block, a.block)), dev)
    ms_plan, _ = timed(lambda: BlockLayout.from_blocks(keep, block=(a.block, a.block))._build_plan(
        a.length, a.length, False, 0), dev, reps=5)
    print(f"device={dev} heads={a.heads} L={a.length} block={a.block} density={a.density} "
          f"nnz={lay.nnz}: from_blocks {ms_layout:.3f} ms, from_blocks+plan {ms_plan:.3f} ms "
          f"(torch {torch.__version__})")


if __name__ == "__main__":
    main()
