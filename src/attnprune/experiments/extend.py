"""Experiment: masks used past their calibrated length, by calibrated policy x extension rule.

A mask is calibrated on ``--calib-len``-token windows; perplexity is then measured on test windows of
``--factor`` times that length, on the tokens past the calibrated length only (teacher forcing: what
generation past the calibration would read). Compared, for every ``--policy`` and ``--sparsity``: the
dense model; the mask with ``beyond="dense"`` (mask inside the calibrated region, dense past it); and
the mask continued past it by each ``--hold`` rule (``attnprune.lengthfree``):

* ``own``: ``beyond="extend"``, the mask's own form (``make_mask``'s default: what ``mass`` computes);
* ``width``: ``PruneMask.extend(hold="width")`` (sinks + band fitted from the mask, the band's width
  line; what ``beyond="extend"`` computed before make_mask fitted the form from the statistics);
* ``density``: ``PruneMask.extend(hold="density")`` (the same structures at the calibration's density);
* ``mass``: ``PruneMask.extend(hold="mass", stats=...)``: sinks + band fitted from the attention
  statistics to keep, per head, the share of attention mass the calibrated mask keeps;
  ``mass:0.9``: to keep 90% of it.

    python -m attnprune.experiments.extend --model smollm2 --data austen --calib-len 256 --factor 2 \\
        --sparsity 0.5,0.8 --policy layer,structured,streaming --hold width,density,mass -o extend.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch


def _nll_past(model, rows: torch.Tensor, start: int, batch_size: int) -> tuple[float, int]:
    """Summed next-token NLL of the tokens at positions > ``start`` of ``rows [n, L]``, and their count."""
    from attnprune.evaluate import token_nll

    total, count = 0.0, 0
    dev = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, rows.shape[0], batch_size):
            ids = rows[i:i + batch_size].to(dev)
            labels = ids.clone()
            labels[:, :start + 1] = -100  # only predictions of tokens past the calibrated length
            s, c = token_nll(model(input_ids=ids).logits, ids, None, labels)
            total, count = total + s, count + c
    return total, count


def _past_sparsity(mask, start: int, length: int) -> float:
    """Sparsity over the causal entries of rows ``start .. length-1`` (the extension), all sites."""
    kept = total = 0
    rows = torch.arange(start, length)
    for n in mask.sites:
        k = mask.site(n).keep_tokens(length, length)[:, start:]
        k = k & (torch.arange(length)[None, None, :] <= rows[None, :, None])
        kept += int(k.sum())
        total += k.shape[0] * int((rows + 1).sum())
    return 1 - kept / total


def parse_hold(spec: str) -> tuple[str, float | None]:
    """``"own"`` / ``"width"`` / ``"density"`` / ``"mass"`` / ``"mass:0.9"`` -> (hold, mass); ``"own"`` is
    ``(None, None)``: the mask's own form, what ``beyond="extend"`` continues."""
    from attnprune.errors import InvalidArgumentError
    from attnprune.lengthfree import HOLDS

    hold, _, m = spec.partition(":")
    if spec == "own":
        return None, None
    if hold not in HOLDS or (m and hold != "mass"):
        raise InvalidArgumentError(f"--hold entries are own, width, density, mass or mass:<share>, got {spec!r}")
    try:
        mass = float(m) if m else None
    except ValueError:
        raise InvalidArgumentError(f"--hold {spec!r}: the mass share must be a number") from None
    return hold, mass


def run(model_name: str, data: str, calib_len: int, factor: int, sparsities, *, calib_seqs: int = 16,
        test_seqs: int = 8, policies=("layer",), holds=("width", "density"), block: int | None = None,
        batch_size: int = 2, device: str = "cpu", progress: bool = True) -> dict:
    """Returns ``{"dense_ppl_past", "rows": [{"policy", "sparsity", "achieved", "dense_ppl_past",
    "dense_vs_dense", "holds": {spec: {"ppl_past", "vs_dense", "vs_beyond_dense",
    "extended_sparsity"}}}], ...}``; ``vs_dense`` relative to the dense model, ``vs_beyond_dense`` to
    the same mask under ``beyond="dense"``."""
    from attnprune import apply, make_mask, observe
    from attnprune.data import load_dataset, lm_batches
    from attnprune.models import load_model
    from attnprune.report import environment

    t0 = time.time()
    parsed = {h: parse_hold(h) for h in holds}
    loaded = load_model(model_name)
    model = loaded.model.to(device).eval()
    ds = load_dataset(data)
    calib = lm_batches(ds.texts("calibration"), loaded.tokenizer, seq_len=calib_len, batch_size=batch_size,
                       max_sequences=calib_seqs)
    long_len = factor * calib_len
    rows = torch.cat([b["input_ids"] for b in lm_batches(ds.texts("test"), loaded.tokenizer, seq_len=long_len,
                                                         batch_size=batch_size, max_sequences=test_seqs)])
    stats = observe(model, calib, granularity=block or 1, progress=progress, description=ds.describe("calibration"))
    ppl = lambda s, c: math.exp(s / c)
    past = lambda: ppl(*_nll_past(model, rows, calib_len - 1, batch_size))
    dense = past()
    out = {"model": model_name, "data": data, "calib_len": calib_len, "eval_len": long_len,
           "policies": list(policies), "holds": list(holds), "block": block, "calib_seqs": calib_seqs,
           "test_seqs": int(rows.shape[0]), "dense_ppl_past": dense, "rows": []}
    for policy in policies:
        for s in sparsities:
            mask = make_mask(stats, s, policy=policy, block=block)
            with apply(model, mask, beyond="dense"):
                bd = past()
            row = {"policy": policy, "sparsity": s, "achieved": mask.sparsity, "dense_ppl_past": bd,
                   "dense_vs_dense": bd / dense - 1, "holds": {}}
            for spec, (hold, mass) in parsed.items():
                ext = mask.extend(long_len, hold=hold, **({"stats": stats, "mass": mass} if hold == "mass" else {}))
                # the mask's own form (make_mask's default: from the stats) is measured through beyond="extend"
                with (apply(model, mask, beyond="extend") if hold is None else apply(model, ext)):
                    p = past()
                row["holds"][spec] = {"ppl_past": p, "vs_dense": p / dense - 1, "vs_beyond_dense": p / bd - 1,
                                      "extended_sparsity": _past_sparsity(ext, calib_len, long_len)}
            out["rows"].append(row)
            print(row, file=sys.stderr, flush=True)
    out["seconds"] = time.time() - t0
    out["environment"] = environment(device)
    return out


def main(argv=None) -> int:
    from attnprune._io import write_json

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default="austen")
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--factor", type=int, default=2)
    ap.add_argument("--sparsity", default="0.5,0.8")
    ap.add_argument("--policy", default="layer", help="comma-separated policies (make_mask)")
    ap.add_argument("--hold", default="width,density,mass",
                    help="comma-separated extension rules: own (beyond='extend'), width, density, mass, mass:<share>")
    ap.add_argument("--block", type=int, default=None)
    ap.add_argument("--calib-seqs", type=int, default=16)
    ap.add_argument("--test-seqs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("-o", "--out", default=None)
    a = ap.parse_args(argv)
    holds = a.hold.split(",")
    for h in holds:
        parse_hold(h)  # bad values fail before the model loads
    res = run(a.model, a.data, a.calib_len, a.factor, [float(x) for x in a.sparsity.split(",")],
              calib_seqs=a.calib_seqs, test_seqs=a.test_seqs, policies=a.policy.split(","), holds=holds,
              block=a.block, batch_size=a.batch_size, device=a.device)
    res["command"] = "python -m attnprune.experiments.extend " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"dense model, perplexity past {a.calib_len} tokens: {res['dense_ppl_past']:.3f}")
    for r in res["rows"]:
        print(f"{r['policy']} {r['sparsity']:.2f}: beyond=dense {r['dense_ppl_past']:.3f} "
              f"({100 * r['dense_vs_dense']:+.1f}%)")
        for spec, h in r["holds"].items():
            print(f"    {spec:>9}: {h['ppl_past']:.3f} ({100 * h['vs_dense']:+.1f}% vs dense model, "
                  f"{100 * h['vs_beyond_dense']:+.1f}% vs beyond=dense; extension "
                  f"{h['extended_sparsity']:.3f} sparse)")
    if a.out:
        write_json(a.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
