"""``attnprune demo``: the main job. SmolLM2-135M on Jane Austen, on the CPU.

Observes attention on the Austen calibration split, builds masks at several sparsities with the
paper's per-layer rule (``layer``) and with the random control (``random``), measures perplexity
dense versus AP versus random on the Austen test split (which never overlaps the calibration
split), and writes a report (``report.md``, ``results.json``, PNG plots) into ``--out``.

Presets. Measured times, 2-core CPU (AMD EPYC), torch 2.13 CPU build, transformers 5.24: on a
fresh clone ``attnprune demo`` (``default``) took 273 s, 56 s of them the one-time conversion of
the GGUF weights that only the first run does (issue 12); ``small`` took 87 s with the weights
already converted, its 2 cores shared with other jobs (load average 2.3-4.5; 2026-12-02).

* ``small``:   128-token sequences, 8 calibration / 4 test, sparsities 0.5 0.9, token level.
* ``default``: 256-token sequences, 32 calibration / 16 test, sparsities 0.5 0.7 0.8 0.9 0.95,
  token level.
* ``large``:   512-token sequences, 64 calibration / 32 test, all four policies, token level
  and 32x32 blocks: roughly an hour on 2 cores, estimated (observation took 8 minutes and a
  masked evaluation about one; there are 40 of them).
* ``gpu``:     8192-token sequences, 8 calibration / 8 test, 128x128 blocks (what the kernels skip),
  policies layer streaming elastic-floor random at 80/90/95%, scores prob and value, on CUDA with
  ``--backend auto``: 66 s on one H100, model already converted (RESULTS.md).
"""

from __future__ import annotations

import argparse
import time

from ..experiments.sweep import DEMO_PRESETS as PRESETS
from ..experiments.sweep import demo_settings as settings
from .common import use_shared
from .eval import print_outputs


def register(sub) -> None:
    p = sub.add_parser("demo", help="the main job: SmolLM2-135M on Jane Austen, dense vs AP vs random (CPU)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="default", help="run size (default: default)")
    p.add_argument("--model", default="smollm2", help="model spec (default smollm2)")
    p.add_argument("--data", default="austen", help="data spec (default austen)")
    p.add_argument("-o", "--out", default=None, help="output folder (default runs/demo-<preset>)")
    use_shared(p, seed=0, backend=(None, "attnprune backend (default reference; auto for --preset gpu)"),
               device=(None, "cpu, cuda, cuda:1 (default: the GPU when present; cuda for --preset gpu)"))
    p.set_defaults(func=main)


def main(args) -> int:
    t0 = time.perf_counter()
    from ..experiments.sweep import run_eval

    s = settings(args.preset, model=args.model, data=args.data, out=args.out, seed=args.seed,
                 backend=args.backend, device=args.device, progress=not args.quiet)
    print(f"attnprune demo, preset {args.preset}: {s.model} on {s.data}, {s.seq_len}-token sequences, "
          f"{s.calib} calibration / {s.test} test, sparsities {' '.join(map(str, s.sparsities))}, "
          f"policies {' '.join(s.policies)}", flush=True)
    files = run_eval(s)
    r = files["result"]
    print()
    print(_summary(r))
    print()
    print_outputs(files)
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return 0


def _summary(r) -> str:
    """Dense vs AP (layer) vs random perplexity per sparsity, token level, as plain text."""
    lines = [f"perplexity on the test split ({r.dense['count']} predicted tokens): dense {r.dense['value']:.3f}"]
    for block in dict.fromkeys(x["block"] for x in r.runs):
        lvl = "token level" if block is None else f"{block}x{block} blocks"
        pols = list(dict.fromkeys(x["policy"] for x in r.runs if x["block"] == block))
        lines.append(f"{lvl}:  sparsity  " + "  ".join(f"{p:>9s}" for p in pols))
        for sp in sorted(dict.fromkeys(x["sparsity"] for x in r.runs if x["block"] == block)):
            cells = []
            for p in pols:
                x = next((x for x in r.runs if x["block"] == block and x["policy"] == p and x["sparsity"] == sp), None)
                cells.append(f"{x['value']:9.3f}" if x else f"{'-':>9s}")
            lines.append(f"{'':{len(lvl) + 3}s}{sp:<8g}  " + "  ".join(cells))
    return "\n".join(lines)
