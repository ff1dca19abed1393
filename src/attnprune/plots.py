"""Pictures of observed attention (``AttentionStats``), and the matplotlib plumbing every plot uses.

* ``plot_heatmaps(stats, path)``: the mean attention of every head of every site, one mosaic per file;
* ``mean_patterns`` / ``offset_profile``: per group of site kinds, the mean attention over heads (top-left
  corner) of every site, and the mean attention by key-minus-query offset; ``plot_patterns`` /
  ``plot_offsets`` draw them.

``pyplot()`` is ``matplotlib.pyplot`` on the Agg backend, or None without matplotlib; ``need_pyplot()``
raises ``MissingDependencyError`` instead; ``save_png`` writes a figure atomically and closes it.
The sweep's own plots (quality and kept mass against sparsity) are in ``report.py``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ._io import atomic_path
from .errors import MissingDependencyError


# --------------------------------------------------------------------------------------------
# matplotlib
# --------------------------------------------------------------------------------------------

def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        return None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def need_pyplot():
    """``pyplot()``, or ``MissingDependencyError`` when matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        raise MissingDependencyError("plots need matplotlib: pip install matplotlib")
    return plt


def save_png(fig, path: str | os.PathLike, dpi: int = 100, *, tight: bool = True) -> Path:
    """Write ``fig`` to ``path`` as PNG (atomically; ``tight``: cropped to its content) and close it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, **({"bbox_inches": "tight"} if tight else {}))
    pyplot().close(fig)
    return path


# --------------------------------------------------------------------------------------------
# heatmaps: every head of every site
# --------------------------------------------------------------------------------------------

def _short_site(name: str) -> str:
    parts = name.split(".")
    nums = [x for x in parts if x.isdigit()]
    return (f"L{nums[-1]} " if nums else "") + parts[-1]


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
    plt = need_pyplot()
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
        written.append(save_png(fig, p, dpi=110))
    return written


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


def plot_patterns(stats, path: str | os.PathLike, size: int = 48, *, groups: dict[str, str] | None = None,
                  labels: dict[str, str] | None = None) -> Path:
    """PNG: mean attention (over heads) per site (rows) and group of site kinds (columns), a last row
    averaging the group's sites; log colour scale. ``labels``: group -> column title."""
    plt = need_pyplot()
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
    return save_png(fig, path, dpi=90, tight=False)


def plot_offsets(stats, path: str | os.PathLike, *, groups: dict[str, str] | None = None,
                 labels: dict[str, str] | None = None) -> Path:
    """PNG: mean attention by key - query offset, a line per group of site kinds (log scale)."""
    plt = need_pyplot()
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
    return save_png(fig, path, dpi=90)
