"""Reports of a sweep: a Markdown table, JSON with every number, and PNG plots.

``write_report(result, out_dir, stats=...)`` writes (all atomically, through ``_io.atomic_path``):

* ``results.json``: the whole ``SweepResult`` plus the environment (versions, CPU, date);
* ``report.md``: the dense value, one table per granularity (policies x sparsities) and a table of
  every run (target and achieved sparsity, metric, change from dense, kept attention mass);
* ``quality_vs_sparsity.png``: the metric against achieved sparsity, one line per policy, one
  panel per granularity, the dense value as a dashed line;
* ``kept_mass.png``: the share of observed attention mass each site keeps, per policy and sparsity;
* ``attention_heatmaps.png`` (``_2``, ... when there are many layers): mean attention
  ``stats.mean(site)`` of every head of every site, layers as rows and heads as columns, log colour scale.

Plots need matplotlib (``pip install matplotlib``); without it the tables are still written and
the plots are skipped with a note in ``report.md``. The heatmaps and the other pictures of observed
attention (patterns and offsets by site kind) are drawn by ``plots.py``; ``report`` re-exports them.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ._io import write_json, write_text_atomic
from .environment import ENV_KEYS, environment  # noqa: F401 - re-exported: the record of every result file
from .plots import (KINDS, mean_patterns, offset_profile, plot_heatmaps, plot_offsets,  # noqa: F401 - re-exported
                    plot_patterns, save_png)
from .plots import pyplot as _plt

POLICY_STYLE = {"layer": ("tab:blue", "o"), "head": ("tab:orange", "s"), "global": ("tab:green", "^"),
                "random": ("tab:red", "x")}


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------

def _level(block) -> str:
    return "token level" if block is None else f"{block}x{block} blocks"


def _fmt(metric: str, v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if metric == "accuracy":
        return f"{100 * v:.2f}%"
    return f"{v:.3f}"


def _fmt_delta(metric: str, d: float | None) -> str:
    if d is None:
        return "-"
    if metric == "accuracy":
        return f"{100 * d:+.2f}"
    return f"{d:+.3f}"


def run_label(x: dict) -> str:
    """A run's policy, with the score that ranked its mask when that is not the attention probability."""
    score = x.get("score") or "prob"
    return x["policy"] if score == "prob" else f"{x['policy']} ({score})"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def markdown(result, *, title: str | None = None, env: dict | None = None, plots: list[str] | None = None) -> str:
    """The report as Markdown. ``result``: a ``SweepResult`` (or its dict)."""
    r = result if isinstance(result, dict) else result.to_dict()
    metric = r["metric"]
    better = "higher" if metric == "accuracy" else "lower"
    dense = r["dense"]["value"]
    lines = [f"# {title or 'attnprune evaluation'}", ""]
    lines.append(f"Model `{r.get('model') or '?'}`, task {r['task']}, metric **{metric}** ({better} is better).")
    if r.get("data"):
        lines.append("Data: " + ", ".join(f"{k} = {v}" for k, v in r["data"].items()) + ".")
    unit = "predicted tokens" if metric == "perplexity" else "examples"
    lines += ["", f"**Dense: {_fmt(metric, dense)}** ({r['dense']['count']} test {unit}).", ""]
    ratio = metric == "perplexity"  # a ratio to dense reads across lengths and test sets (log-perplexity gaps)
    lines.append(f"Cells: metric (change from dense{', ratio to dense' if ratio else ''}). Sparsity is the target "
                 "share of *attendable* entries pruned (causal-future entries not counted); achieved values are "
                 "in the last table.")
    runs = r["runs"]
    blocks = list(dict.fromkeys(x["block"] for x in runs))
    extra = list(r.get("extra_dense") or {})
    for name in [None] + extra:  # the test split, then every extra test set (e.g. another domain)
        ref = dense if name is None else r["extra_dense"][name]["value"]

        def value(x):
            return x["value"] if name is None else (x.get("extra") or {}).get(name, {}).get("value")
        for block in blocks:
            sub = [x for x in runs if x["block"] == block]
            sps = sorted(dict.fromkeys(x["sparsity"] for x in sub))
            pols = list(dict.fromkeys(run_label(x) for x in sub))
            head = _level(block) + ("" if name is None else f", on {name} (dense {_fmt(metric, ref)})")
            lines += ["", f"## {head}", ""]
            lines.append("| policy | " + " | ".join(f"{s:g}" for s in sps) + " |")
            lines.append("|---|" + "---|" * len(sps))
            for p in pols:
                cells = []
                for s in sps:
                    x = next((x for x in sub if run_label(x) == p and x["sparsity"] == s), None)
                    v = None if x is None else value(x)
                    cells.append("-" if v is None else f"{_fmt(metric, v)} ({_fmt_delta(metric, v - ref)}"
                                 + (f", x{v / ref:.3f})" if ratio and ref > 0 else ")"))
                lines.append(f"| {p} | " + " | ".join(cells) + " |")
    lines += ["", "## All runs", "",
              "| granularity | policy | target | achieved | paper convention | " + metric
              + " | change | kept attention mass | eval s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for x in runs:
        lines.append(f"| {_level(x['block'])} | {run_label(x)} | {x['sparsity']:g} | {_pct(x.get('achieved'))} | "
                     f"{_pct(x.get('achieved_paper'))} | {_fmt(metric, x['value'])} | "
                     f"{_fmt_delta(metric, x['delta'])} | {_pct(x.get('mean_kept_mass'))} | "
                     f"{x.get('seconds', 0):.1f} |")
    lines += ["", "*paper convention*: causal-future entries counted as pruned (Rugina et al.). "
              "*kept attention mass*: mean over sites of the share of observed mean attention the mask keeps."]
    if r.get("timings"):
        lines += ["", "Timings: " + ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items()) + "."]
    if r.get("config"):
        lines += ["", "Config: `" + json.dumps(r["config"]) + "`"]
    if env:
        lines += ["", f"Run {env.get('date_utc')} on {env.get('cpu')} ({env.get('cpu_count')} CPUs, "
                  f"{env.get('torch_threads')} torch threads{', ' + env['gpu'] if env.get('gpu') else ''}); "
                  f"torch {env.get('torch')}, transformers {env.get('transformers')}, python {env.get('python')}."]
    if plots is not None:
        lines += ["", "## Plots", ""]
        lines += [f"![{p}]({p})" for p in plots] if plots else ["(plots skipped: matplotlib is not installed)"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# plots of the sweep (the attention pictures: plots.py)
# --------------------------------------------------------------------------------------------

def plot_quality(result, path: str | os.PathLike) -> Path:
    """Metric against achieved sparsity, a line per policy, a panel per granularity; dense dashed."""
    plt = _plt()
    r = result if isinstance(result, dict) else result.to_dict()
    metric, dense = r["metric"], r["dense"]["value"]
    blocks = list(dict.fromkeys(x["block"] for x in r["runs"])) or [None]
    fig, axes = plt.subplots(1, len(blocks), figsize=(5.2 * len(blocks), 4), squeeze=False, sharey=True)
    for ax, block in zip(axes[0], blocks):
        sub = [x for x in r["runs"] if x["block"] == block]
        for p in dict.fromkeys(run_label(x) for x in sub):
            pts = sorted((x["achieved"] if x.get("achieved") is not None else x["sparsity"], x["value"])
                         for x in sub if run_label(x) == p)
            color, marker = POLICY_STYLE.get(p, (None, "o"))
            ax.plot([100 * a for a, _ in pts], [v * (100 if metric == "accuracy" else 1) for _, v in pts],
                    marker=marker, color=color, label=p)
        ax.axhline(dense * (100 if metric == "accuracy" else 1), color="black", ls="--", lw=1, label="dense")
        ax.set_title(_level(block))
        ax.legend(fontsize=8)
        ax.set_xlabel("achieved sparsity (% of attendable entries pruned)")
        ax.grid(alpha=0.3)
        if metric == "perplexity":
            ax.set_yscale("log")
    axes[0][0].set_ylabel("perplexity (log scale)" if metric == "perplexity" else "accuracy (%)")
    fig.suptitle(f"{r.get('model') or 'model'}: {metric} vs attention sparsity")
    fig.tight_layout()
    return save_png(fig, path)


def plot_kept_mass(result, path: str | os.PathLike) -> Path:
    """Share of observed attention mass each site keeps (x: site in model order), a panel per
    (granularity, policy), a line per sparsity."""
    plt = _plt()
    r = result if isinstance(result, dict) else result.to_dict()
    keys = list(dict.fromkeys((x["block"], run_label(x)) for x in r["runs"] if x.get("kept_mass")))
    ncol = min(4, max(1, len(keys)))
    nrow = math.ceil(len(keys) / ncol) if keys else 1
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow), squeeze=False, sharey=True)
    cmap = plt.get_cmap("viridis")
    for i, (block, policy) in enumerate(keys):
        ax = axes[i // ncol][i % ncol]
        sub = sorted((x for x in r["runs"] if x["block"] == block and run_label(x) == policy),
                     key=lambda x: x["sparsity"])
        for j, x in enumerate(sub):
            vals = list(x["kept_mass"].values())
            ax.plot(range(len(vals)), [100 * v for v in vals], color=cmap(j / max(1, len(sub) - 1)),
                    marker=".", label=f"{x['sparsity']:g}")
        ax.set_title(f"{policy}, {_level(block)}", fontsize=9)
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
        if i % ncol == 0:
            ax.set_ylabel("attention mass kept (%)")
        if i // ncol == nrow - 1:
            ax.set_xlabel("site (model order)")
        if i == 0:
            ax.legend(title="sparsity", fontsize=7)
    for k in range(len(keys), nrow * ncol):
        axes[k // ncol][k % ncol].axis("off")
    fig.suptitle("share of observed attention mass kept per site")
    fig.tight_layout()
    return save_png(fig, path)


# --------------------------------------------------------------------------------------------
# everything at once
# --------------------------------------------------------------------------------------------

def write_report(result, out_dir: str | os.PathLike, *, stats=None, title: str | None = None,
                 extra: dict | None = None, plots: bool = True) -> dict[str, Path]:
    """Write ``results.json``, ``report.md`` and the PNG plots into ``out_dir``.

    result: a ``SweepResult``; stats: the ``AttentionStats`` the masks came from (for the heatmaps;
    optional); extra: more JSON-able facts stored under ``"extra"`` in ``results.json``.
    Returns ``{"json": ..., "markdown": ..., "quality_plot": ..., "kept_mass_plot": ...,
    "heatmaps": [...]}`` (plot keys only for plots written).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    r = result if isinstance(result, dict) else result.to_dict()
    files: dict[str, Any] = {}
    plot_names: list[str] | None = None
    if plots:
        if _plt() is None:
            plot_names = []
        else:
            plot_names = []
            if r["runs"]:
                files["quality_plot"] = plot_quality(r, out / "quality_vs_sparsity.png")
                files["kept_mass_plot"] = plot_kept_mass(r, out / "kept_mass.png")
                plot_names += ["quality_vs_sparsity.png", "kept_mass.png"]
            if stats is not None:
                files["heatmaps"] = plot_heatmaps(stats, out / "attention_heatmaps.png")
                plot_names += [p.name for p in files["heatmaps"]]
    doc = dict(r)
    doc["env"] = env
    if extra:
        doc["extra"] = extra
    files["json"] = out / "results.json"
    write_json(files["json"], doc)
    files["markdown"] = out / "report.md"
    write_text_atomic(files["markdown"], markdown(r, title=title, env=env, plots=plot_names))
    return files
