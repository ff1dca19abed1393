"""End-to-end check of ``backend="triton"`` on a real model with real AP masks (issue 3, "done when").

Run on the GPU machine from the repository root (needs the SmolLM2 weights and the Austen data
cache, see ``bench/gpu_session.sh``)::

    PYTHONPATH=src python bench/e2e_real.py --out $OUT/e2e

SmolLM2-135M is observed on the Austen calibration split at ``--seq-len`` tokens; token-level AP
masks (``layer`` policy) are built at each sparsity. On test sequences it compares, in bf16, the
logits of the ``triton`` backend and of the ``reference`` backend (dense masked attention) with a
float32 reference-backend run, reports the relative error ||x - ref|| / ||ref|| of each and the
perplexity of each, and times one prefill per backend. Passes when triton's error is at most
twice the bf16 reference backend's own error plus 1e-3. Writes ``e2e_real.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import torch  # noqa: E402

from attnprune import data as D  # noqa: E402
from attnprune._io import write_json  # noqa: E402
from attnprune.apply import apply  # noqa: E402
from attnprune.models import load_model  # noqa: E402
from attnprune.observe import observe  # noqa: E402
from attnprune.policies import make_mask  # noqa: E402
from attnprune.report import environment  # noqa: E402


def logits_and_time(model, ids, mask, backend):
    def run():
        with torch.no_grad():
            if mask is None:
                return model(input_ids=ids).logits.float()
            with apply(model, mask, backend=backend):
                return model(input_ids=ids).logits.float()

    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    run()
    sync()
    t0 = time.perf_counter()
    out = run()
    sync()
    return out, (time.perf_counter() - t0) * 1e3


def ppl(logits, ids):
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    return float(loss.exp())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--test", type=int, default=8)
    ap.add_argument("--sparsities", default="0.5,0.9")
    ap.add_argument("--out", default="runs/e2e")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backends", default="reference,triton", help="the masked backends compared")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    lm = load_model("smollm2")
    model, tok, L = lm.model.to(a.device).eval(), lm.tokenizer, a.seq_len
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    ds = D.load_dataset("austen")
    calib = D.chunk_tokens(D.token_stream(ds["calibration"], tok), L, max_sequences=a.calib).to(a.device)
    test = D.chunk_tokens(D.token_stream(ds["test"], tok), L, max_sequences=a.test).to(a.device)
    stats = observe(model, [{"input_ids": calib[i:i + 8]} for i in range(0, calib.shape[0], 8)], progress=False)
    result = {"model": lm.name, "seq_len": L, "test_sequences": test.shape[0], "env": environment(a.device),
              "rows": []}
    ok = True
    for s in [float(x) for x in a.sparsities.split(",")]:
        mask = make_mask(stats, s, policy="layer")
        ref32, _ = logits_and_time(model, test, mask, "reference")
        row = {"sparsity": s, "achieved": mask.sparsity, "ppl_fp32_reference": ppl(ref32, test)}
        for backend in [*a.backends.split(","), None]:
            out, ms = logits_and_time(model16, test, mask if backend else None, backend or "reference")
            name = backend or "dense_sdpa"
            row[f"{name}_ms"] = round(ms, 2)
            row[f"{name}_ppl_bf16"] = ppl(out, test)
            if backend:
                row[f"{name}_rel_err_vs_fp32"] = float((out - ref32).norm() / ref32.norm())
        tol = 2 * row["reference_rel_err_vs_fp32"] + 1e-3
        row["pass"] = row.get("triton_rel_err_vs_fp32", 0.0) <= tol
        ok &= row["pass"]
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        write_json(os.path.join(a.out, "e2e_real.json"), result)
    result["pass"] = ok
    write_json(os.path.join(a.out, "e2e_real.json"), result)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
