"""How good can a static mask get when it is calibrated on the very text it is scored on? (issue 11)

``attnprune eval`` refuses a calibration split equal to the test split: a mask would be judged on the
windows it was made from. That is exactly the diagnostic wanted here: an *oracle* calibration, the
best any calibration set could do for a policy's form. If a policy calibrated on the test windows
still costs about what it costs with honest calibration, the remaining loss is the price of the
static form (one mask for every input), not of too little or the wrong calibration data.

Run from the repository root (the GPU machine: ``bash bench/gpu_session.sh weights oracle``)::

    PYTHONPATH=src python3 bench/oracle_calib.py --seq-len 8192 --calib 8 --test 8 --blocks 128 \\
        --policies layer elastic elastic-floor --scores prob value loss --sparsities 0.8 0.9 -o runs/oracle

It runs ``run_eval`` (the code behind ``attnprune eval``) on a copy of the dataset with one more split,
``oracle``, holding the test split's records, calibrates on it, and switches off (in this process only)
the sweep's check that no calibration window is also a test window; the report's data line says
``calibration_split = oracle``. Everything else is ``attnprune eval``'s: same windows, same report.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data", default="austen")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--calib", type=int, default=8, help="calibration windows (from the test split's text)")
    p.add_argument("--test", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--blocks", type=int, nargs="+", default=[128])
    p.add_argument("--policies", nargs="+", default=["layer", "elastic", "elastic-floor"])
    p.add_argument("--scores", nargs="+", default=["prob", "value", "loss"])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9])
    p.add_argument("--ood-data", default=None, help="a second data spec, measured under every mask too")
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("-o", "--out", default="runs/oracle")
    a = p.parse_args(argv)

    from attnprune import data as D
    from attnprune.errors import InvalidArgumentError
    from attnprune.experiments import sweep_loop
    from attnprune.experiments.sweep import EvalSettings, run_eval

    # the sweep refuses calibration windows that are also test windows; here that overlap is the point
    check, sweep_loop.check_disjoint = sweep_loop.check_disjoint, lambda calib, test: None
    try:
        ds = D.load_dataset(a.data)
        oracle = dataclasses.replace(ds, splits={**ds.splits, "oracle": ds["test"]},
                                     meta={**ds.meta, "oracle": "calibration on the test split's records"})
        s = EvalSettings(model=a.model, data=a.data, out=a.out, calib_split="oracle", seq_len=a.seq_len,
                         calib=a.calib, test=a.test, batch_size=a.batch_size, blocks=tuple(a.blocks),
                         policies=tuple(a.policies), scores=tuple(a.scores), sparsities=tuple(a.sparsities),
                         ood_data=a.ood_data, backend=a.backend, device=a.device, heatmaps=False,
                         title=f"oracle calibration (on the test windows): {a.model} on {a.data}")
        out = run_eval(s, dataset=oracle)
    except InvalidArgumentError as e:
        print(f"oracle_calib: {e}", file=sys.stderr)
        return 2
    finally:
        sweep_loop.check_disjoint = check
    print("wrote", *(v for k, v in out.items() if k not in ("result", "seconds")), sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
