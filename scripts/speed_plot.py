"""The whole-model speed-up against sparsity from saved ``attnprune bench --model`` JSON files.

    python scripts/speed_plot.py bench/results/model_smollm2_h200_2026-11-28.json \\
        bench/results/model_smollm2_b4_h200_2026-11-28.json --plot docs/results/smollm2_speed_vs_sparsity.png

The rows of all files are drawn together (``attnprune.bench.plot.plot_speed``); ``attnprune bench --model
... --plot PNG`` draws the same picture for a new run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from attnprune.bench.plot import plot_speed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="JSON files written by attnprune bench --model")
    ap.add_argument("--plot", required=True, help="PNG to write")
    ap.add_argument("--title", default=None)
    a = ap.parse_args()
    rows = [r for f in a.files for r in json.load(open(f))["rows"]]
    print(plot_speed(rows, a.plot, title=a.title))


if __name__ == "__main__":
    main()
