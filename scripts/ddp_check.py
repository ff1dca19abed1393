"""Check that data-parallel runs (torchrun, NCCL on GPUs / gloo on the CPU) match one process.

    python scripts/ddp_check.py --model MODEL --data DATA --out DIR [--nproc 2] [--steps N] [--seq-len L]
        [--batch-size B] [--num-seqs N] [--precision fp32] [--mask] [--backend reference]

1. observe: ``torchrun -m attnprune observe`` (each rank takes every NPROC-th batch, the sums are
   all-reduced, rank 0 writes) against ``attnprune observe`` in one process on all batches: sums must
   agree to --stats-atol, counts (and lengths) exactly.
2. finetune: ``torchrun -m attnprune finetune --batch-size B`` vs one process with ``--batch-size NPROC*B``
   (train.BatchPlan gives both the same global batch, the same sequences). Compared: per-step losses of
   metrics.jsonl (--loss-rtol; target counts exactly) and the final model.safetensors (L2 norm of the
   difference at most --weight-rtol x L2 norm of the 1-process run's update, or 3x the distance of a
   third run, one process accumulating NPROC micro-batches (the same sums in another order: the
   floating-point floor), whichever is larger; Adam makes single elements noisy, so the max abs diff
   is reported, not tested). With --mask, a mask at sparsity 0.5
   is made from the one-process stats (``attnprune mask``) and the pair is run again with it.
   Models with dropout (tiny-gpt2: 0.1) cannot match: each rank seeds its own RNG; use tiny-llama.
3. DIR/ddp_check.json and DIR/ddp_check.md (wall times, versions, devices, diffs, pass/fail);
   exit status 1 when a comparison fails. Logs of every run: DIR/<run>.log.

CPU smoke test (gloo):
    .venv/bin/python scripts/ddp_check.py --model tiny-llama --data random --steps 4 --seq-len 32 \\
        --batch-size 2 --num-seqs 16 --mask --out /tmp/ddp_check
2-GPU machine (NCCL), from the repository root:
    HF_HUB_OFFLINE=1 PYTHONPATH=src python scripts/ddp_check.py --model smollm2 --data austen --seq-len 256 \\
        --batch-size 4 --steps 20 --num-seqs 64 --nproc 2 --precision fp32 --mask --out runs/ddp_check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def launch(name: str, args: list[str], nproc: int, out: Path, timeout: float) -> float:
    """Run ``python [-m torch.distributed.run ...] args`` with its output in out/name.log; wall seconds."""
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
                              if nproc > 1 else []) + args
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    log = out / f"{name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=timeout).returncode
    wall = time.perf_counter() - t0
    print(f"{name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {wall:.1f} s", flush=True)
    if rc != 0:
        print("".join(log.read_text().splitlines(keepends=True)[-40:]), file=sys.stderr)
        raise SystemExit(f"run {name} failed; log: {log}")
    return wall


def compare_stats(a_path: Path, b_path: Path) -> dict:
    from attnprune.stats import AttentionStats

    a, b = AttentionStats.load(a_path), AttentionStats.load(b_path)
    assert a.sites == b.sites, "different sites"
    sd, same = 0.0, a.num_sequences == b.num_sequences
    for s in a.sites:
        if a.sum(s).shape != b.sum(s).shape:
            return {"max_abs_diff_sum": float("inf"), "counts_identical": False}
        sd = max(sd, float((a.sum(s) - b.sum(s)).abs().max()))
        same = same and bool((a.count(s) == b.count(s)).all()) and (a.q_len(s), a.k_len(s)) == (b.q_len(s), b.k_len(s))
    return {"max_abs_diff_sum": sd, "counts_identical": same, "num_sequences": [a.num_sequences, b.num_sequences]}


def compare_runs(ddp: Path, one: Path, w0: dict) -> dict:
    from safetensors.torch import load_file

    rows = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if x.strip()] for d in (ddp, one)]
    la, lb = ([r["loss"] for r in rs] for rs in rows)
    wa, wb = load_file(str(ddp / "model.safetensors")), load_file(str(one / "model.safetensors"))
    assert wa.keys() == wb.keys() and len(la) == len(lb), "different weights or step counts"
    dw = max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)
    num = sum(float((wa[k].double() - wb[k].double()).pow(2).sum()) for k in wa) ** 0.5
    den = sum(float(wb[k].double().pow(2).sum()) for k in wb) ** 0.5
    upd = sum(float((wb[k].double() - w0[k].double()).pow(2).sum()) for k in wb if k in w0) ** 0.5
    return {"losses_ddp": la, "losses_one": lb, "final_loss": la[-1],
            "same_targets": [r["targets"] for r in rows[0]] == [r["targets"] for r in rows[1]],
            "max_abs_diff_loss": max(abs(x - y) for x, y in zip(la, lb)),
            "max_rel_diff_loss": max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(la, lb)),
            "max_abs_diff_weights": dw, "rel_l2_diff_weights": num / max(den, 1e-30),
            "l2_update_1proc": upd, "rel_l2_diff_of_update": num / max(upd, 1e-30)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, kw in [("--model", dict(required=True)), ("--data", dict(required=True)), ("--out", dict(required=True)),
                     ("--nproc", dict(type=int, default=2)), ("--steps", dict(type=int, default=20)),
                     ("--seq-len", dict(type=int, default=256)), ("--batch-size", dict(type=int, default=4)),
                     ("--num-seqs", dict(type=int, default=64)), ("--lr", dict(default="5e-5")),
                     ("--precision", dict(default="fp32", choices=("auto", "fp32", "bf16"))),
                     ("--backend", dict(default="reference")), ("--mask", dict(action="store_true")),
                     ("--stats-atol", dict(type=float, default=1e-4)), ("--loss-rtol", dict(type=float, default=1e-4)),
                     ("--weight-rtol", dict(type=float, default=1e-3)), ("--timeout", dict(type=float, default=1800))]:
        p.add_argument(flag, **kw)
    a = p.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from attnprune._io import write_json, write_text_atomic
    from attnprune.models import load_model
    from attnprune.report import environment

    # initial weights, to size the fine-tuning update; also fails fast on a bad --model and fills any
    # model cache (smollm2's float32 conversion) before the ranks start
    w0 = {k: v.detach().clone() for k, v in load_model(a.model).model.state_dict().items()}
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    n = a.nproc
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    report = {"argv": sys.argv, "env": environment(), "devices": gpus or ["cpu"],
              "backend": "nccl" if torch.cuda.is_available() else "gloo", "runs": {}, "checks": {},
              "tolerances": {"stats_atol": a.stats_atol, "loss_rtol": a.loss_rtol, "weight_rtol": a.weight_rtol}}
    runs, checks = report["runs"], report["checks"]
    obs = ["-m", "attnprune", "--quiet", "observe", "--model", a.model, "--data", a.data, "--seq-len",
           str(a.seq_len), "--batch-size", str(a.batch_size), "--num-seqs", str(a.num_seqs)]
    for name, k in (("observe_ddp", n), ("observe_1", 1)):
        wall = launch(name, obs + ["-o", str(out / f"{name}.safetensors")], k, out, a.timeout)
        runs[name] = {"procs": k, "wall_s": wall}
    c = compare_stats(out / "observe_ddp.safetensors", out / "observe_1.safetensors")
    c["pass"] = c["counts_identical"] and c["max_abs_diff_sum"] <= a.stats_atol
    checks["observe_ddp"] = c
    pairs = [("dense", [])]
    if a.mask:
        runs["mask"] = {"procs": 1, "wall_s": 0.0}
        runs["mask"]["wall_s"] = launch("mask", ["-m", "attnprune", "mask", str(out / "observe_1.safetensors"), "--sparsity", "0.5",
                        "-o", str(out / "mask.safetensors")], 1, out, a.timeout)
        pairs.append(("masked", ["--mask", str(out / "mask.safetensors"), "--backend", a.backend]))
    for label, extra in pairs:
        # the third run, one process accumulating NPROC micro-batches of B, sums the same gradients in
        # another order: its distance to the one-process run is the floating-point floor a DDP run
        # (which also sums per-rank partial gradients) cannot be expected to beat
        for name, k, bs, acc in ((f"finetune_{label}_ddp", n, a.batch_size, 1),
                                 (f"finetune_{label}_1", 1, n * a.batch_size, 1),
                                 (f"finetune_{label}_1accum", 1, a.batch_size, n)):
            shutil.rmtree(out / name, ignore_errors=True)  # finetune refuses a folder holding checkpoints
            ft = ["-m", "attnprune", "--quiet", "finetune", "--model", a.model, "--data", a.data, "--out",
                  str(out / name), "--steps", str(a.steps), "--seq-len", str(a.seq_len), "--batch-size", str(bs),
                  "--grad-accum", str(acc), "--lr", a.lr, "--precision", a.precision, "--max-grad-norm", "1"] + extra
            runs[name] = {"procs": k, "batch_size": bs, "grad_accum": acc, "wall_s": launch(name, ft, k, out, a.timeout)}
        floor = compare_runs(out / f"finetune_{label}_1accum", out / f"finetune_{label}_1", w0)
        c = compare_runs(out / f"finetune_{label}_ddp", out / f"finetune_{label}_1", w0)
        c["reorder_floor_rel_l2"] = floor["rel_l2_diff_of_update"]
        c["weight_tolerance"] = max(a.weight_rtol, 3 * floor["rel_l2_diff_of_update"])
        c["pass"] = (c["same_targets"] and c["max_rel_diff_loss"] <= a.loss_rtol
                     and c["rel_l2_diff_of_update"] <= c["weight_tolerance"])
        checks[f"finetune_{label}_ddp"] = c
        runs[f"finetune_{label}_ddp"]["final_loss"] = c["final_loss"]
        runs[f"finetune_{label}_1"]["final_loss"] = c["losses_one"][-1]
        runs[f"finetune_{label}_1accum"]["final_loss"] = floor["final_loss"]
    ok = all(c["pass"] for c in checks.values())
    report["pass"] = ok
    write_json(out / "ddp_check.json", report, indent=2)
    md = [f"# DDP check: {a.model} on {a.data}", "",
          f"torch {torch.__version__}; devices: {', '.join(report['devices'])}; backend {report['backend']}; "
          f"precision {a.precision}; tolerances: stats sum atol {a.stats_atol:g} (counts exact), "
          f"loss rtol {a.loss_rtol:g}, weights: L2 norm of the difference <= {a.weight_rtol:g} x L2 norm "
          f"of the 1-process run's update (final - initial), or 3 x that of the 1-process run with gradient "
          f"accumulation (same sums, another order), whichever is larger", "",
          "| run | processes | backend | wall s | final loss | max diff vs 1 process | pass |",
          "|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        c = checks.get(name)
        if c is None:
            diff = "" if name == "mask" else "(floor: same sums, another order)" if name.endswith("_1accum") else "(reference)"
            verdict = ""
        elif "max_abs_diff_sum" in c:
            diff = f"sum {c['max_abs_diff_sum']:.2e}, counts {'identical' if c['counts_identical'] else 'DIFFER'}"
            verdict = "pass" if c["pass"] else "FAIL"
        else:
            diff = (f"loss {c['max_abs_diff_loss']:.2e} (rel {c['max_rel_diff_loss']:.2e}), weights "
                    f"max {c['max_abs_diff_weights']:.2e}, L2 {c['rel_l2_diff_of_update']:.2e} of the update; "
                    f"accumulation floor {c['reorder_floor_rel_l2']:.2e}")
            verdict = "pass" if c["pass"] else "FAIL"
        loss = f"{r['final_loss']:.4f}" if "final_loss" in r else ""
        md.append(f"| {name} | {r['procs']} | {report['backend'] if r['procs'] > 1 else '-'} | {r['wall_s']:.1f} "
                  f"| {loss} | {diff} | {verdict} |")
    write_text_atomic(out / "ddp_check.md", "\n".join(md) + "\n")
    print("\n".join(md))
    print(f"{'PASS' if ok else 'FAIL'}: wrote {out / 'ddp_check.json'} and {out / 'ddp_check.md'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
