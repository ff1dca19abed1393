"""Tables and plots of a long-context policy comparison from ``attnprune eval`` result files.

    python scripts/longctx_report.py results/longctx_h200_2026-12-02/*_results.json \
        --plot docs/results/smollm2_longctx_perplexity.png > /tmp/tables.md

Runs of several files with the same sequence length are merged (e.g. a second run adding a score);
one Markdown table per (length, granularity): for every policy (and score) and target sparsity the
achieved sparsity, the perplexity and its ratio to dense, in domain and on the extra (out-of-domain)
test set, and the share of the log-perplexity gap of the paper's ``layer`` policy that it closes.
The plot: perplexity ratio against achieved sparsity, a panel per (length, granularity, test set).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from attnprune.report import run_label  # noqa: E402


def load(paths):
    """``{(seq_len, block): {"dense", "ood_dense", "ood", "runs": {(label, sparsity): run}}}``."""
    out: dict = {}
    for p in paths:
        r = json.load(open(p))
        n = r["data"]["seq_len"]
        extra = list(r.get("extra_dense") or {})
        for x in r["runs"]:
            g = out.setdefault((n, x["block"]), {"dense": r["dense"]["value"], "runs": {},
                                                 "ood": extra[0] if extra else None,
                                                 "ood_dense": r["extra_dense"][extra[0]]["value"] if extra else None})
            g["runs"][(run_label(x), x["sparsity"])] = x
    return out


def _ood(x, name):
    return ((x.get("extra") or {}).get(name) or {}).get("value")


SCORE_ORDER = ("prob", "value", "influence", "loss")
POLICY_ORDER = ("layer", "global", "structured", "structured-global", "streaming", "random", "elastic", "elastic-site",
                "elastic-floor")


def _ordered(g) -> list[str]:
    """Labels by score, then policy (the paper's ``layer`` first)."""
    def key(lab):
        pol, _, sc = lab.partition(" (")
        sc = sc.rstrip(")") or "prob"
        return (SCORE_ORDER.index(sc) if sc in SCORE_ORDER else 9, POLICY_ORDER.index(pol) if pol in POLICY_ORDER else 9)
    return sorted(dict.fromkeys(lab for lab, _ in g["runs"]), key=key)


def table(key, g) -> str:
    n, block = key
    sps = sorted({s for _, s in g["runs"]})
    labels = _ordered(g)
    d, od = g["dense"], g["ood_dense"]
    lines = [f"**{n} tokens, {block}x{block} blocks** (dense {d:.2f}; out of domain {od:.2f}). Gap closed: share "
             "of `layer`'s log-perplexity gap to dense closed, in domain (n/c: achieved sparsity differs from "
             "`layer`'s by more than 0.5 points, not comparable).", "",
             "| policy (score) | " + " | ".join(f"{s:g}: achieved, ppl (x dense), OOD (x dense), gap closed" for s in sps) + " |",
             "|---|" + "---|" * len(sps)]
    for lab in labels:
        cells = []
        for s in sps:
            x = g["runs"].get((lab, s))
            if x is None:
                cells.append("-")
                continue
            o = _ood(x, g["ood"])
            ref = g["runs"].get(("layer", s))
            closed = ""
            if ref is not None and lab != "layer" and ref["value"] > d:
                if abs(x["achieved"] - ref["achieved"]) > 0.005:  # not the same budget: no comparison
                    closed = ", n/c"
                else:
                    closed = f", {100 * (1 - math.log(x['value'] / d) / math.log(ref['value'] / d)):.0f}%"
            cells.append(f"{100 * x['achieved']:.1f}%, {x['value']:.2f} (x{x['value'] / d:.3f}), "
                         f"{o:.2f} (x{o / od:.3f}){closed}")
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(groups, path, only=None) -> None:
    """Perplexity ratio vs achieved sparsity per (length, granularity) and test set; ``only``: the row labels
    to draw (e.g. ``["layer", "elastic-floor (value)"]``; None: every row but random)."""
    if only:
        missing = set(only) - {lab for g in groups.values() for lab, _ in g["runs"]}
        if missing:
            raise SystemExit(f"--plot-only: no rows labelled {sorted(missing)}")
        groups = {k: {**g, "runs": {key: x for key, x in g["runs"].items() if key[0] in only}}
                  for k, g in groups.items()}
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(groups)
    fig, axes = plt.subplots(2, len(keys), figsize=(4.2 * len(keys), 7), squeeze=False)
    # one colour per policy present (random omitted): the known order first, then any other, by name
    found = {lab.partition(" (")[0] for g in groups.values() for lab, _ in g["runs"]} - {"random"}
    shown = [p for p in POLICY_ORDER if p in found] + sorted(found - set(POLICY_ORDER))
    colour = {p: f"C{i % 10}" for i, p in enumerate(shown)}
    for j, key in enumerate(keys):
        g = groups[key]
        for i, (what, dense) in enumerate((("in domain (Austen)", g["dense"]), ("out of domain (Bible)", g["ood_dense"]))):
            ax = axes[i][j]
            for lab in _ordered(g):
                if lab.startswith("random"):
                    continue
                pts = sorted((x["achieved"], (x["value"] if i == 0 else _ood(x, g["ood"])) / dense)
                             for (lb, _), x in g["runs"].items() if lb == lab)
                pol, _, sc = lab.partition(" (")
                sc = sc.rstrip(")") or "prob"
                color = colour[pol]
                style = {"prob": "-", "value": "--", "influence": ":", "loss": "-."}.get(sc, "-")
                ax.plot([100 * a for a, _ in pts], [v for _, v in pts], style, color=color, marker=".",
                        label=lab, lw=1.6 if sc == "prob" else 1.0)
            ax.set_yscale("log")
            ax.set_title(f"{key[0]} tokens, {key[1]}-blocks, {what}", fontsize=8)
            ax.grid(alpha=0.3)
            ax.set_xlabel("achieved block sparsity (% of attendable entries)", fontsize=7)
            if j == 0:
                ax.set_ylabel("perplexity / dense (log)")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colour[p], lw=2, label=p) for p in shown]
    handles += [Line2D([], [], color="k", ls=ls, label=sc) for sc, ls in
                (("prob", "-"), ("value", "--"), ("influence", ":"), ("loss", "-."))]
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    fig.suptitle("SmolLM2-135M, no fine-tuning: perplexity ratio vs block sparsity; colour = policy, line = score "
                 "(solid prob, dashed value, dotted influence, dash-dot loss; random omitted)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.92, 1))
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="results.json files of attnprune eval runs")
    ap.add_argument("--plot", default=None, help="write the plot here (PNG)")
    ap.add_argument("--plot-only", nargs="+", default=None, metavar="LABEL",
                    help='draw only these rows, labelled as in the tables (e.g. layer "elastic-floor (value)")')
    args = ap.parse_args()
    groups = load(args.results)
    print("\n\n".join(table(k, groups[k]) for k in sorted(groups)))
    if args.plot:
        plot(groups, args.plot, args.plot_only)


if __name__ == "__main__":
    main()
