"""The recovery experiment (issue 5): SmolLM2-135M on Jane Austen, masks at 80/90/95% sparsity.

Perplexity on the Austen test split

* before fine-tuning: dense, AP mask (``layer`` policy), random mask (same kept count per layer);
* after K steps of masked fine-tuning (AP mask, and random mask), evaluated with that mask;
* after the same K steps of dense fine-tuning (the fair control: how much of the gain is just
  adapting to Austen), evaluated dense and with the AP mask applied afterwards (prune after
  fine-tuning).

All runs start from the same pretrained weights, see the same training sequences in the same order
(train split), and the mask is observed on the calibration split; calibration, train and test never
overlap. ``bash scripts/recovery.sh [options]`` runs :func:`main`; it writes ``OUT/results.json``
(``meta`` with the settings and the environment record, ``results``), ``OUT/recovery.md`` (the
table) and ``OUT/runs/<run>/metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from .. import data as D
from .._io import write_json, write_text_atomic
from ..apply import apply
from ..commands.common import add_list_argument
from ..evaluate import perplexity
from ..models import load_model
from ..observe import observe
from ..stats import AttentionStats
from ..policies import make_mask
from ..environment import environment
from ..runtime import default_device
from ..train import TrainConfig, finetune

POLICIES = ("layer", "random")  # the default policies; any of attnprune.policies.POLICIES


def _mask_name(pol: str) -> str:
    return {"layer": "AP (layer)", "random": "random"}.get(pol, pol)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/recovery.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="K: fine-tuning steps per run")
    p.add_argument("--epochs", type=int, default=1,
                   help="passes over the train windows in K steps (default 1: K x batch distinct windows; "
                        "E: ceil(K x batch / E) windows, each seen E times, reshuffled every pass)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--schedule", default="constant")
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps")
    p.add_argument("--backend", default="reference",
                   help="attention backend while fine-tuning (reference: exact; triton: the GPU kernels)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: the GPU if present)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="training precision (auto: bf16 autocast on a GPU); evaluation is always fp32")
    p.add_argument("--calib", type=int, default=32, help="calibration sequences for observe")
    p.add_argument("--test", type=int, default=16, help="test sequences for perplexity")
    add_list_argument(p, "--sparsities", item=float, default=(0.8, 0.9, 0.95),
                      help="mask sparsities (default 0.8 0.9 0.95)")
    add_list_argument(p, "--policies", what="policy", default=POLICIES,
                      help="mask policies (default layer random); every one but random is also applied "
                           "after dense fine-tuning")
    p.add_argument("--block", type=int, default=None,
                   help="b x b block masks (observed at granularity b: memory bounded at long lengths); "
                        "default token level")
    p.add_argument("--score", default="prob", help="what ranks the masks (observe's score; default prob)")
    p.add_argument("--stats", default=None, metavar="FILE",
                   help="build the masks from these saved statistics (e.g. attnprune eval's stats-ablation.safetensors, "
                        "observed on the same calibration windows) instead of observing; their score replaces --score")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/recovery")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--model", default="smollm2", help=argparse.SUPPRESS)  # small models for tests
    p.add_argument("--data", default="austen", help=argparse.SUPPRESS)
    return p


def windows(ds, tok, split: str, n: int, seq_len: int) -> torch.Tensor:
    """The first ``n`` windows of ``seq_len`` tokens of a split (tokenizing only as many records as needed)."""
    recs, take = ds[split], 64
    while True:
        ids = D.token_stream(recs[:take], tok)
        if ids.numel() >= n * seq_len or take >= len(recs):
            return D.chunk_tokens(ids, seq_len, max_sequences=n)
        take *= 2


def _batches(rows: torch.Tensor) -> list[dict]:
    return [{"input_ids": rows[i:i + 8]} for i in range(0, rows.shape[0], 8)]


def run(a: argparse.Namespace, *, command: str = "", log=print) -> dict:
    """Run the experiment with the parsed options ``a``; returns ``{"meta": ..., "results": ...}``
    (also written to ``a.out``)."""
    out = Path(a.out)
    t_start = time.perf_counter()
    lm = load_model(a.model)
    model, tok, L = lm.model, lm.tokenizer, a.seq_len
    device = default_device(a.device)
    model.to(device)
    ds = D.load_dataset(a.data)

    n_train = -(-a.steps * a.batch_size // a.epochs)
    calib, test = windows(ds, tok, "calibration", a.calib, L), windows(ds, tok, "test", a.test, L)
    train = windows(ds, tok, "train", n_train, L)
    if train.shape[0] < n_train:
        raise SystemExit(f"the train split gives only {train.shape[0]} windows; need {n_train} "
                         f"(--steps x --batch-size / --epochs): use fewer steps or more --epochs")
    log(f"data: {calib.shape[0]} calibration, {train.shape[0]} train, {test.shape[0]} test sequences of {L} tokens")

    orig = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if a.stats:
        stats = AttentionStats.load(a.stats)
        a.score = stats.score
    else:
        stats = observe(model, _batches(calib), granularity=a.block or 1, score=a.score, progress=not a.quiet,
                        description=ds.describe("calibration"))
    masks = {(s, pol): make_mask(stats, s, policy=pol, seed=a.seed, block=a.block)
             for s in a.sparsities for pol in a.policies}
    log("observed and built masks: " + ", ".join(f"{pol}@{s}: {m.sparsity:.3f}" for (s, pol), m in masks.items()))

    def ppl(mask=None) -> float:
        if mask is None:
            return perplexity(model, _batches(test), progress=False).value
        with apply(model, mask):
            return perplexity(model, _batches(test), progress=False).value

    def train_run(name: str, mask=None) -> dict:
        model.load_state_dict(orig)
        cfg = TrainConfig(steps=a.steps, lr=a.lr, batch_size=a.batch_size, schedule=a.schedule, seed=a.seed,
                          warmup_steps=a.warmup, device=str(device), precision=a.precision, backend=a.backend,
                          final_checkpoint=False, save_weights=False, progress=not a.quiet)
        t0 = time.perf_counter()
        r = finetune(model, train, mask=mask, out_dir=out / "runs" / name, config=cfg)
        return {"train_s": round(time.perf_counter() - t0, 1), "first_loss": r.history[0].loss,
                "last_loss": r.last_loss}

    write = _writer(a, out, command=command, lm=lm, ds=ds, device=device, L=L, calib=calib, test=test,
                    train=train, t_start=t_start)
    res = {"dense": {"before": ppl()}}
    log(f"dense before: {res['dense']['before']:.3f}")
    for (s, pol), m in masks.items():
        res[f"{pol}@{s}"] = {"sparsity": s, "policy": pol, "achieved": m.sparsity, "before": ppl(m)}
        log(f"{pol}@{s} before: {res[f'{pol}@{s}']['before']:.3f}")

    res["dense"]["train"] = train_run("dense")
    res["dense"]["after_dense_ft"] = ppl()
    log(f"dense after {a.steps} dense steps: {res['dense']['after_dense_ft']:.3f}")
    for (s, pol), m in masks.items():  # fine-tune dense, then prune: each mask on the dense-fine-tuned weights
        if pol != "random":
            res[f"{pol}@{s}"]["dense_ft_then_mask"] = ppl(m)
    write(res, done=False)
    for (s, pol), m in masks.items():
        res[f"{pol}@{s}"]["train"] = train_run(f"{pol}-{s}", m)
        res[f"{pol}@{s}"]["after_masked_ft"] = ppl(m)
        log(f"{pol}@{s} after {a.steps} masked steps: {res[f'{pol}@{s}']['after_masked_ft']:.3f}")
        write(res, done=False)
    return write(res, done=True)


def _writer(a: argparse.Namespace, out: Path, *, command: str, lm, ds, device, L: int, calib, test, train,
            t_start: float):
    """``write(res, done)``: (re)write ``out/results.json`` and ``out/recovery.md`` with the results so
    far (``meta["complete"]`` says whether every run finished: a run stopped by a time limit keeps the
    rows it finished; the table shows only masks fine-tuned already)."""

    def write(res: dict, done: bool) -> dict:
        meta = {
            "command": command,
            "env": environment(device),
            "model": lm.name, "data": ds.describe(), "seq_len": L, "steps": a.steps, "batch_size": a.batch_size,
            "epochs": a.epochs, "lr": a.lr, "schedule": a.schedule, "warmup": a.warmup, "precision": a.precision, "device": str(device),
            "backend": a.backend, "policies": list(a.policies), "block": a.block, "score": a.score,
            "calibration_sequences": calib.shape[0], "test_sequences": test.shape[0],
            "test_tokens_predicted": test.shape[0] * (L - 1), "train_sequences": train.shape[0],
            "seconds": round(time.perf_counter() - t_start, 1),
            "cpu_seconds": round(time.process_time(), 1),  # all threads of this process
            "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],  # others' load slows wall time
            "complete": done,
        }
        doc = {"meta": meta, "results": res}
        write_json(out / "results.json", doc, indent=2)
        write_text_atomic(out / "recovery.md", f"K = {a.steps} steps, batch {a.batch_size} x {L} tokens, lr {a.lr:g} "
                          f"({a.schedule}, warm-up {a.warmup})" + ("" if done else " (incomplete)") + "\n\n"
                          + table(doc) + "\n\n```\n" + json.dumps(meta, indent=2) + "\n```\n")
        return doc

    return write


def table(doc: dict) -> str:
    """The Markdown table of a ``results.json`` document."""
    res = doc["results"]
    sparsities = list(dict.fromkeys(r["sparsity"] for k, r in res.items() if k != "dense"))
    policies = list(dict.fromkeys(r["policy"] for k, r in res.items() if k != "dense"))
    rows = ["| sparsity | mask | achieved | before FT | after K masked FT | dense FT, then this mask |",
            "|---|---|---|---|---|---|",
            f"| 0 | dense | 0 | {res['dense']['before']:.2f} | {res['dense']['after_dense_ft']:.2f} (K dense steps) | |"]
    for s in sparsities:
        for pol in policies:
            r = res[f"{pol}@{s}"]
            if "after_masked_ft" not in r:  # an incomplete run: not fine-tuned yet
                continue
            then = f"{r['dense_ft_then_mask']:.2f}" if "dense_ft_then_mask" in r else ""
            rows.append(f"| {s:g} | {_mask_name(pol)} | {r['achieved']:.3f} | "
                        f"{r['before']:.2f} | {r['after_masked_ft']:.2f} | {then} |")
    return "\n".join(rows)


def check(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Bad options end the run before the model loads (``p.error``: usage, message, exit 2)."""
    from ..errors import AttnPruneError
    from ..observe import SCORES
    from ..commands.common import check_policies

    try:
        check_policies(a.policies)
    except AttnPruneError as e:
        p.error(str(e))
    if a.score not in SCORES:
        p.error(f"--score {a.score!r}: use one of {', '.join(SCORES)}")
    if a.epochs < 1:
        p.error(f"--epochs must be a positive integer, got {a.epochs}")
    if a.block is not None and a.block < 1:
        p.error(f"--block must be a positive integer, got {a.block}")
    if a.stats is not None:
        try:
            g = AttentionStats.load(a.stats).granularity
        except (AttnPruneError, OSError) as e:
            p.error(f"--stats {a.stats}: {e}")
        if a.block is None and g > 1 or a.block is not None and a.block % g:
            p.error(f"--stats {a.stats} holds {g}x{g}-block statistics: give --block as a multiple of {g}")


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    check(p, a)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f} s] {msg}", flush=True)

    argv_text = " ".join(argv if argv is not None else sys.argv[1:])
    doc = run(a, command=f"bash scripts/recovery.sh {argv_text}".rstrip(), log=log)
    print(table(doc))
    log(f"wrote {Path(a.out) / 'results.json'} and {Path(a.out) / 'recovery.md'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
