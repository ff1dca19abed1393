"""KV bytes a ``PrunedKVCache`` holds with real AP masks, against a dense cache (issue 13).

    PYTHONPATH=src python3 bench/kv_share_real.py MASK.safetensors... [--prompt 1024] [--new 512] [--out kv.json]

SmolLM2-135M (the real weights, CPU, float32) greedy-generates ``--new`` tokens after the first ``--prompt``
tokens of an Austen test window, once per mask, with the mask attached (``beyond="error"``: prompt + new must
stay inside the calibrated length) and a ``PrunedKVCache``. Printed per mask: its policy and sparsity, and
``cache.kv_bytes()`` after the prompt and at the end: ``share`` = bytes held for the next position / the
bytes a dense cache holds for the same tokens. The mask decides the share, the weights only the tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import torch  # noqa: E402

import attnprune  # noqa: E402


def _share(model, mask, ids: torch.Tensor, new: int, backend: str = "auto") -> dict:
    with torch.no_grad(), attnprune.apply(model, mask, backend=backend):
        cache = attnprune.PrunedKVCache(model, mask)
        model.generate(ids, past_key_values=cache, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       pad_token_id=0)
        return cache.kv_bytes()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("masks", nargs="+")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--new", type=int, default=512)
    ap.add_argument("--backend", default="auto", help="attnprune backend (gather: block-sparse on the CPU, faster at 8k)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    from attnprune.data import load_dataset, lm_batches
    from attnprune.models import load_model
    from attnprune.report import environment

    masks = [(p, attnprune.PruneMask.load(p)) for p in a.masks]  # bad files fail before the model loads
    for p, m in masks:
        need = a.prompt + a.new
        short = [n for n in m.sites if m.site(n).q_len < need]
        if short:
            raise SystemExit(f"{p}: calibrated for {m.site(short[0]).q_len} tokens, --prompt + --new need {need}")
    lm = load_model(a.model)
    model = lm.model.eval()
    ids = next(iter(lm_batches(load_dataset("austen").texts("test"), lm.tokenizer, seq_len=a.prompt, batch_size=1,
                               max_sequences=1)))["input_ids"]
    rows = []
    for path, mask in masks:
        first = _share(model, mask, ids, 1, a.backend)
        last = _share(model, mask, ids, a.new, a.backend)
        row = {"mask": os.path.basename(path), "policy": mask.meta.get("policy"), "sparsity": mask.sparsity,
               "block": mask.block, "share_after_prompt": first["share"], "share_at_end": last["share"],
               "held_mib_at_end": last["held"] / 2**20, "dense_mib_at_end": last["dense"] / 2**20}
        rows.append(row)
        print(f"{row['mask']:45s} {row['policy']:14s} sparsity {row['sparsity']:.3f}: KV share after the "
              f"{a.prompt}-token prompt {row['share_after_prompt']:.3f}, after {a.new} new tokens "
              f"{row['share_at_end']:.3f} ({row['held_mib_at_end']:.1f} of {row['dense_mib_at_end']:.1f} MiB)",
              flush=True)
    if a.out:
        from attnprune._io import write_json

        write_json(a.out, {"prompt": a.prompt, "new": a.new, "model": a.model, "rows": rows,
                           "environment": environment("cpu")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
