"""The whole-model benchmark as a picture: speed-up over dense against achieved sparsity.

``plot_speed(rows, path)`` takes the rows of ``attnprune bench --model`` (``ModelBenchRow`` objects or the
dicts of its JSON file): one panel per mode (prefill, train), one line per (length, batch) through the
masked rows (synthetic masks; real ``--masks`` rows, variant ``ap-mask``, as crosses), and in the same colour a dashed
line at the speed-up of the model with attention removed (the no-attention bound: what any sparse
kernel could reach at most). Dense is 1.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ..errors import InvalidArgumentError
from ..plots import need_pyplot, save_png

MODES = ("prefill", "train")


def _dict(row) -> dict:
    return dataclasses.asdict(row) if dataclasses.is_dataclass(row) else dict(row)


def _short(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def plot_speed(rows, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Write the speed-up-vs-sparsity plot of whole-model benchmark ``rows`` to ``path`` (PNG)."""
    rows = [_dict(r) for r in rows]
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    if not modes:
        raise InvalidArgumentError("no prefill or train rows to plot (decode rows have no sparsity axis)")
    plt = need_pyplot()
    fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes), 4), squeeze=False)
    groups = sorted({(r["length"], r["batch"]) for r in rows if r["mode"] in modes})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, mode in zip(axes[0], modes):
        for i, (n, b) in enumerate(groups):
            c = colors[i % len(colors)]
            mine = [r for r in rows if r["mode"] == mode and r["length"] == n and r["batch"] == b]
            timed = [r for r in mine if r["achieved_sparsity"] is not None and r["speedup_vs_dense"] is not None]
            synth = sorted((r["achieved_sparsity"], r["speedup_vs_dense"]) for r in timed if r["variant"] == "masked")
            if synth:
                ax.plot(*zip(*synth), "o-", color=c, label=f"{_short(n)} x {b}")
            real = [(r["achieved_sparsity"], r["speedup_vs_dense"]) for r in timed if r["variant"] == "ap-mask"]
            if real:
                ax.plot(*zip(*real), "x", color=c, markersize=8)
            for r in mine:
                if r["variant"] == "no-attention" and r["speedup_vs_dense"]:
                    ax.axhline(r["speedup_vs_dense"], color=c, ls="--", lw=1)
        ax.axhline(1.0, color="gray", lw=1)
        ax.set_title(f"{mode}: dashed = attention removed (bound)")
        ax.set_xlabel("achieved sparsity (attendable blocks pruned)")
        ax.set_ylabel("speed-up over dense SDPA")
        ax.grid(alpha=0.3)
        ax.legend(title="tokens x batch", fontsize=8)
    if title:
        fig.suptitle(title)
    return save_png(fig, path)
