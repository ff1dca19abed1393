"""Profile one attention call per implementation with Nsight Compute (issue 3: why the targets miss).

Run on the GPU machine from the repository root::

    PYTHONPATH=src python bench/ncu_profile.py --out $OUT/ncu      # drives ncu itself

For every (implementation, density) pair it starts ``ncu`` on this same file in ``--child`` mode,
which warms the call up (compiles) outside an NVTX range and then runs it once inside the range
``profile``; ncu only profiles kernels inside that range. The chosen sections (speed of light,
compute workload, warp states, occupancy, launch statistics) are written as CSV per run and a
compact summary of the main metrics per kernel goes to ``ncu_summary.json``.

Limitation (seen on the H200): with ``--modes fwd+bwd`` only the forward kernels are profiled, because
autograd launches the backward kernels from its own thread, outside this thread's NVTX push/pop range.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

SECTIONS = ("SpeedOfLight", "ComputeWorkloadAnalysis", "WarpStateStats", "Occupancy", "LaunchStats",
            "SchedulerStats", "MemoryWorkloadAnalysis")
# (section name fragment, metric name fragment) pairs kept in the summary
KEEP = ("Duration", "Compute (SM) Throughput", "Memory Throughput", "Registers Per Thread",
        "Achieved Occupancy", "Theoretical Occupancy", "Block Size", "Grid Size", "Dynamic Shared Memory Per Block",
        "Static Shared Memory Per Block", "Warp Cycles Per Issued Instruction", "Issue Slots Busy",
        "No Eligible", "Executed Ipc Active", "SM Busy", "Eligible Warps Per Scheduler")


def child(a) -> None:
    import torch

    from attnprune.bench import kernels as bm

    torch.manual_seed(0)
    batch = bm.default_batch(a.length)
    layout = bm.random_block_layout(a.heads, a.length, a.density, causal=False)
    q, k, v = (torch.randn(batch, a.heads, a.length, a.d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    fn = bm._impl_fn(a.impl, layout, False, a.length)
    do = torch.randn_like(q)

    def call():
        if a.mode == "fwd":
            with torch.no_grad():
                fn(q, k, v)
        else:
            fn(q, k, v).backward(do)

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push("profile")
    call()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_pop()


def parse_csv(text: str) -> list[dict]:
    start = text.find('"ID"')
    if start < 0:
        return []
    rows = list(csv.DictReader(io.StringIO(text[start:])))
    kernels: dict[str, dict] = {}
    for r in rows:
        key = f"{r.get('ID')}:{r.get('Kernel Name', '')[:60]}"
        entry = kernels.setdefault(key, {"kernel": r.get("Kernel Name", "")[:120]})
        name = r.get("Metric Name", "")
        if any(f in name for f in KEEP):
            entry[f"{name} [{r.get('Metric Unit', '')}]"] = r.get("Metric Value")
    return list(kernels.values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--impl", default="ours")
    ap.add_argument("--impls", default="ours,flex,cudnn")
    ap.add_argument("--densities", default="1.0,0.1")
    ap.add_argument("--mode", default="fwd", choices=("fwd", "fwd+bwd"))
    ap.add_argument("--modes", default="fwd")
    ap.add_argument("--density", type=float, default=1.0)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--out", default="runs/ncu")
    ap.add_argument("--timeout", type=float, default=240)
    a = ap.parse_args()
    if a.child:
        return child(a)
    from attnprune._io import write_json
    os.makedirs(a.out, exist_ok=True)
    summary = []
    for mode in a.modes.split(","):
        for impl in a.impls.split(","):
            for dens in [float(x) for x in a.densities.split(",")]:
                if impl == "cudnn" and dens < 1.0:
                    continue  # dense kernel: the density does not change its work
                tag = f"{impl}_{mode.replace('+', '')}_d{a.d}_L{a.length}_dens{dens:g}"
                cmd = ["ncu", "--nvtx", "--nvtx-include", "profile/", "--clock-control", "none",
                       "--csv", "--page", "details", *sum((["--section", s] for s in SECTIONS), []),
                       sys.executable, __file__, "--child", "--impl", impl, "--mode", mode,
                       "--density", str(dens), "--d", str(a.d), "--length", str(a.length), "--heads", str(a.heads)]
                t0 = time.time()
                try:
                    p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
                    text, rc = p.stdout, p.returncode
                    err = p.stderr[-2000:]
                except subprocess.TimeoutExpired:
                    text, rc, err = "", -1, "timeout"
                with open(os.path.join(a.out, f"{tag}.csv"), "w") as f:
                    f.write(text)
                kernels = parse_csv(text)
                summary.append({"tag": tag, "impl": impl, "mode": mode, "density": dens, "rc": rc,
                                "seconds": round(time.time() - t0, 1), "kernels": kernels,
                                "stderr_tail": err if rc else ""})
                print(f"{tag}: rc={rc}, {len(kernels)} kernels, {time.time() - t0:.0f} s", flush=True)
                write_json(os.path.join(a.out, "ncu_summary.json"), summary)


if __name__ == "__main__":
    main()
