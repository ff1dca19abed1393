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
the plots are skipped with a note in ``report.md``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from ._io import atomic_path, write_json, write_text_atomic
from .environment import ENV_KEYS, environment  # noqa: F401 - re-exported: the record of every result file
from .errors import MissingDependencyError

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
    lines.append("Cells: metric (change from dense). Sparsity is the target share of *attendable* entries "
                 "pruned (causal-future entries not counted); achieved values are in the last table.")
    runs = r["runs"]
    blocks = list(dict.fromkeys(x["block"] for x in runs))
    for block in blocks:
        sub = [x for x in runs if x["block"] == block]
        sps = sorted(dict.fromkeys(x["sparsity"] for x in sub))
        pols = list(dict.fromkeys(x["policy"] for x in sub))
        lines += ["", f"## {_level(block)}", ""]
        lines.append("| policy | " + " | ".join(f"{s:g}" for s in sps) + " |")
        lines.append("|---|" + "---|" * len(sps))
        for p in pols:
            cells = []
            for s in sps:
                x = next((x for x in sub if x["policy"] == p and x["sparsity"] == s), None)
                cells.append("-" if x is None else f"{_fmt(metric, x['value'])} ({_fmt_delta(metric, x['delta'])})")
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
    lines += ["", "## All runs", "",
              "| granularity | policy | target | achieved | paper convention | " + metric
              + " | change | kept attention mass | eval s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for x in runs:
        lines.append(f"| {_level(x['block'])} | {x['policy']} | {x['sparsity']:g} | {_pct(x.get('achieved'))} | "
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
# plots
# --------------------------------------------------------------------------------------------

def _plt():
    try:
        import matplotlib
    except ModuleNotFoundError:
        return None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int = 100) -> Path:
    plt = _plt()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_quality(result, path: str | os.PathLike) -> Path:
    """Metric against achieved sparsity, a line per policy, a panel per granularity; dense dashed."""
    plt = _plt()
    r = result if isinstance(result, dict) else result.to_dict()
    metric, dense = r["metric"], r["dense"]["value"]
    blocks = list(dict.fromkeys(x["block"] for x in r["runs"])) or [None]
    fig, axes = plt.subplots(1, len(blocks), figsize=(5.2 * len(blocks), 4), squeeze=False, sharey=True)
    for ax, block in zip(axes[0], blocks):
        sub = [x for x in r["runs"] if x["block"] == block]
        for p in dict.fromkeys(x["policy"] for x in sub):
            pts = sorted((x["achieved"] if x.get("achieved") is not None else x["sparsity"], x["value"])
                         for x in sub if x["policy"] == p)
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
    return _save(fig, Path(path))


def plot_kept_mass(result, path: str | os.PathLike) -> Path:
    """Share of observed attention mass each site keeps (x: site in model order), a panel per
    (granularity, policy), a line per sparsity."""
    plt = _plt()
    r = result if isinstance(result, dict) else result.to_dict()
    keys = list(dict.fromkeys((x["block"], x["policy"]) for x in r["runs"]))
    ncol = min(4, max(1, len(keys)))
    nrow = math.ceil(len(keys) / ncol) if keys else 1
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow), squeeze=False, sharey=True)
    cmap = plt.get_cmap("viridis")
    for i, (block, policy) in enumerate(keys):
        ax = axes[i // ncol][i % ncol]
        sub = sorted((x for x in r["runs"] if x["block"] == block and x["policy"] == policy),
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
    return _save(fig, Path(path))


def _pool(m: torch.Tensor, size: int) -> torch.Tensor:
    """Average-pool ``m: [H, Q, K]`` (NaN = unobserved, ignored) so neither side exceeds ``size``."""
    f = max(1, math.ceil(max(m.shape[1], m.shape[2]) / size))
    if f == 1:
        return m
    ok = torch.isfinite(m)
    val = torch.where(ok, m, torch.zeros_like(m)).unsqueeze(1)
    cnt = ok.to(m.dtype).unsqueeze(1)
    s = torch.nn.functional.avg_pool2d(val, f, ceil_mode=True)
    c = torch.nn.functional.avg_pool2d(cnt, f, ceil_mode=True)
    return torch.where(c > 0, s / c.clamp_min(1e-12), torch.full_like(s, float("nan"))).squeeze(1)


def plot_heatmaps(stats, path: str | os.PathLike, *, max_rows: int = 16, max_heads: int = 16,
                  size: int = 96) -> list[Path]:
    """Mean attention of every head of every site: ``stats.mean(site): [H, Q, K]`` drawn as one
    mosaic per file, sites as rows, heads as columns (query down, key across), log colour scale,
    never-observed entries blank. Maps longer than ``size`` are average-pooled to ``size``.
    ``max_rows`` sites per file (more go to ``<name>_2.png`` ...); at most ``max_heads`` heads.
    Returns the paths written."""
    plt = _plt()
    from matplotlib.colors import LogNorm

    path = Path(path)
    sites = list(stats.sites)
    chunks = [sites[i:i + max_rows] for i in range(0, len(sites), max_rows)] or [[]]
    written = []
    for ci, chunk in enumerate(chunks):
        maps = [_pool(stats.mean(s).float()[:max_heads], size) for s in chunk]
        heads = max([m.shape[0] for m in maps] + [1])
        cq = max([m.shape[1] for m in maps] + [1])
        ck = max([m.shape[2] for m in maps] + [1])
        gap = max(1, ck // 12)
        mosaic = torch.full((max(1, len(chunk)) * (cq + gap), heads * (ck + gap)), float("nan"))
        for ri, m in enumerate(maps):
            for h in range(m.shape[0]):
                r0, c0 = ri * (cq + gap), h * (ck + gap)
                mosaic[r0:r0 + m.shape[1], c0:c0 + m.shape[2]] = m[h]
        mosaic[~torch.isfinite(mosaic) | (mosaic <= 0)] = float("nan")
        mosaic = mosaic.clamp_min(1e-5)
        fig, ax = plt.subplots(figsize=(1.1 * heads + 2.2, 1.1 * max(1, len(chunk)) + 0.8))
        im = ax.imshow(mosaic.numpy(), norm=LogNorm(vmin=1e-4, vmax=1.0), cmap="magma",
                       interpolation="nearest", aspect="equal")
        ax.set_xticks([h * (ck + gap) + ck / 2 for h in range(heads)], [f"head {h}" for h in range(heads)],
                      fontsize=7)
        ax.xaxis.tick_top()
        ax.set_yticks([ri * (cq + gap) + cq / 2 for ri in range(len(chunk))],
                      [_short_site(s) for s in chunk], fontsize=7)
        for side in ax.spines.values():
            side.set_visible(False)
        ax.tick_params(length=0)
        fig.colorbar(im, ax=ax, shrink=0.5, label="mean attention probability")
        gl = "" if stats.granularity == 1 else f" ({stats.granularity}x{stats.granularity} blocks)"
        ax.set_title(f"mean attention per site and head{gl} (query down, key across)", fontsize=9, pad=18)
        p = path if ci == 0 else path.with_name(f"{path.stem}_{ci + 1}{path.suffix}")
        written.append(_save(fig, p, dpi=110))
    return written


def _short_site(name: str) -> str:
    parts = name.split(".")
    nums = [x for x in parts if x.isdigit()]
    return (f"L{nums[-1]} " if nums else "") + parts[-1]


# --------------------------------------------------------------------------------------------
# attention patterns and offsets, by site kind
# --------------------------------------------------------------------------------------------

KINDS = {"self": "self-attention", "causal": "causal self-attention", "cross": "cross-attention"}


def _groups(stats, groups: dict[str, str] | None) -> tuple[dict[str, str], list[str]]:
    """``groups``: site kind -> group name (default: the kinds themselves); returns it and the names in order."""
    groups = groups or {k: k for k in KINDS}
    return groups, list(dict.fromkeys(groups.values()))


def mean_patterns(stats, size: int = 48, *, groups: dict[str, str] | None = None) -> dict[str, list[torch.Tensor]]:
    """Per group of site kinds (``groups``: kind -> name, default the kinds), per site in model order:
    the mean attention ``[q, k]`` over heads of the top-left ``size`` x ``size`` corner (NaN where never
    observed)."""
    groups, names = _groups(stats, groups)
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for site in stats.sites:
        m = stats.mean(site)[:, :size, :size]
        out[groups[stats.infos[site].kind]].append(torch.nanmean(m, dim=0))
    return out


def offset_profile(stats, max_offset: int = 24, *, groups: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Per group of site kinds: mean attention probability by key-minus-query offset
    (``-max_offset..max_offset``: ``float64 [2 max_offset + 1]``, NaN where never observed), averaged over
    the group's sites, heads and query positions (observed entries). ``"offsets"``: the offsets."""
    groups, names = _groups(stats, groups)
    prof = {}
    offs = torch.arange(-max_offset, max_offset + 1)
    for g in names:
        sums = torch.zeros(len(offs), dtype=torch.float64)
        cnt = torch.zeros(len(offs), dtype=torch.float64)
        for site in stats.sites:
            if groups[stats.infos[site].kind] != g:
                continue
            m = stats.mean(site).to(torch.float64)  # [H, Q, K]
            q, k = m.shape[1], m.shape[2]
            d = torch.arange(k)[None, :] - torch.arange(q)[:, None]
            for n, o in enumerate(offs.tolist()):
                sel = m[:, d == o]
                sel = sel[~torch.isnan(sel)]
                sums[n] += sel.sum()
                cnt[n] += sel.numel()
        prof[g] = torch.where(cnt > 0, sums / cnt.clamp(min=1), torch.full_like(sums, math.nan))
    prof["offsets"] = offs
    return prof


def _need_plt():
    plt = _plt()
    if plt is None:
        raise MissingDependencyError("plots need matplotlib: pip install matplotlib")
    return plt


def plot_patterns(stats, path: str | os.PathLike, size: int = 48, *, groups: dict[str, str] | None = None,
                  labels: dict[str, str] | None = None) -> Path:
    """PNG: mean attention (over heads) per site (rows) and group of site kinds (columns), a last row
    averaging the group's sites; log colour scale. ``labels``: group -> column title."""
    plt = _need_plt()
    from matplotlib.colors import LogNorm

    pats = mean_patterns(stats, size, groups=groups)
    labels = {**KINDS, **(labels or {})}
    layers = max([len(v) for v in pats.values()] + [0])
    fig, axes = plt.subplots(layers + 1, len(pats), figsize=(10 / 3 * len(pats), 3.2 * (layers + 1)), squeeze=False)
    im = None
    for c, (g, maps) in enumerate(pats.items()):
        rows = maps + ([torch.nanmean(torch.stack(maps), 0)] if maps else [])
        for r in range(layers + 1):
            ax = axes[r][c]
            ax.set_xticks([]), ax.set_yticks([])
            if r >= len(rows):
                ax.axis("off")
                continue
            im = ax.imshow(rows[r].clamp(min=1e-4).numpy(), norm=LogNorm(vmin=1e-4, vmax=1.0), cmap="viridis",
                           interpolation="nearest")
            ax.set_title(f"{labels.get(g, g)}, " + (f"layer {r}" if r < len(rows) - 1 else "mean"), fontsize=9)
            if r == layers:
                ax.set_xlabel("key position"), ax.set_ylabel("query position")
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.5, label="mean attention probability")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return Path(path)


def plot_offsets(stats, path: str | os.PathLike, *, groups: dict[str, str] | None = None,
                 labels: dict[str, str] | None = None) -> Path:
    """PNG: mean attention by key - query offset, a line per group of site kinds (log scale)."""
    plt = _need_plt()
    prof = offset_profile(stats, groups=groups)
    labels = {**KINDS, **(labels or {})}
    fig, ax = plt.subplots(figsize=(7, 4))
    for g, values in prof.items():
        if g != "offsets":
            ax.plot(prof["offsets"].numpy(), values.numpy(), marker=".", label=labels.get(g, g))
    ax.set_yscale("log")
    ax.set_xlabel("key position - query position")
    ax.set_ylabel("mean attention probability")
    ax.legend()
    ax.grid(alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


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
