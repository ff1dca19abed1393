"""The translation experiment's report: attention pattern and offset plots, the BLEU plot and the
Markdown result table (from ``results.json`` and the dense model's ``stats.safetensors``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .. import plots
from .._io import atomic_path
from ..errors import InvalidArgumentError, MissingDependencyError
from ..plots import need_pyplot
from .translation_data import ATTENTION_TYPES, TYPE_LABELS

GROUPS = {"self": "encoder", "causal": "decoder", "cross": "cross"}  # site kind -> attention type


def mean_patterns(stats, size: int = 48) -> dict[str, list[torch.Tensor]]:
    """Per attention type (encoder, decoder, cross), per layer: the mean attention [q, k] over heads
    (``plots.mean_patterns`` with the kinds named by attention type)."""
    return plots.mean_patterns(stats, size, groups=GROUPS)


def offset_profile(stats, max_offset: int = 24) -> dict[str, torch.Tensor]:
    """Per attention type: mean attention probability by key-minus-query offset (``plots.offset_profile``)."""
    return plots.offset_profile(stats, max_offset, groups=GROUPS)


def plot_patterns(stats, path: str | os.PathLike, size: int = 48) -> None:
    """PNG: mean attention per layer and attention type (``plots.plot_patterns``)."""
    plots.plot_patterns(stats, path, size, groups=GROUPS, labels=TYPE_LABELS)


def plot_offsets(stats, path: str | os.PathLike) -> None:
    """PNG: mean attention by key - query offset per attention type (``plots.plot_offsets``)."""
    plots.plot_offsets(stats, path, groups=GROUPS, labels=TYPE_LABELS)


def plot_bleu(results: dict, path: str | os.PathLike) -> None:
    """PNG: retrained BLEU versus sparsity, one panel per attention type, AP versus random, with the
    dense and dense-continued lines."""
    plt = need_pyplot()
    types = [t for t in ATTENTION_TYPES if any(r["type"] == t for r in results["runs"])]
    if not types:
        return
    fig, axes = plt.subplots(1, len(types), figsize=(3.6 * len(types), 3.4), squeeze=False, sharey=True)
    for ax, t in zip(axes[0], types):
        for pol, style in (("layer", "o-"), ("random", "s--")):
            rs = sorted((r for r in results["runs"] if r["type"] == t and r["policy"] == pol),
                        key=lambda r: r["sparsity"])
            for key, alpha in (("bleu", 1.0), ("bleu_zero_shot", 0.4)):
                pts = [(r["sparsity"], r[key]) for r in rs if r.get(key) is not None]
                if pts:
                    ax.plot(*zip(*pts), style, alpha=alpha,
                            label=("AP" if pol == "layer" else "random") + (" (no retraining)" if alpha < 1 else ""))
        for key, ls, lab in (("dense", ":", "dense"), ("dense_continued", "-.", "dense + retrain steps")):
            if results.get(key, {}).get("bleu") is not None:
                ax.axhline(results[key]["bleu"], color="k", ls=ls, lw=1, label=lab)
        ax.set_title(TYPE_LABELS[t], fontsize=10)
        ax.set_xlabel("sparsity")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test BLEU")
    axes[0][-1].legend(fontsize=7)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def results_markdown(results: dict) -> str:
    """The result table as Markdown: BLEU per attention type and sparsity, AP versus random,
    retrained and (if measured) before retraining."""
    cfg = results["config"]
    k = results.get("retrain_steps_used", cfg["retrain_steps"])
    lines = [
        "# Translation: attention pruning by attention type", "",
        f"English -> Spanish, `bible-en-es` ({results['data']['train']} training / {results['data']['test']} "
        f"test pairs), BART {cfg['layers']}+{cfg['layers']} layers, d={cfg['d_model']}, {cfg['heads']} heads, "
        f"shared BPE vocabulary {results['data']['vocab_size']}; greedy decoding, sacreBLEU "
        f"{results['env'].get('sacrebleu', '?')} (13a) on the test split.", "",
        f"Dense: {cfg['train_steps']} steps x {cfg['batch_size']} pairs from scratch. Masks: observed on "
        f"{results['data'].get('observed', 0)} training pairs; `layer` (AP) vs `random`; retrained "
        f"{k} steps from the dense weights with the mask attached.", "",
        f"- dense: BLEU **{_fmt(results.get('dense', {}).get('bleu'))}**",
        f"- dense + {k} more dense steps (the control for retraining): BLEU "
        f"**{_fmt(results.get('dense_continued', {}).get('bleu'))}**", "",
        "| attention type | sparsity | AP | random | AP, no retraining | random, no retraining | achieved |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for t in ATTENTION_TYPES:
        for s in cfg["sparsities"]:
            rs = {r["policy"]: r for r in results["runs"] if r["type"] == t and abs(r["sparsity"] - s) < 1e-9}
            if not rs:
                continue
            ap, rnd = rs.get("layer", {}), rs.get("random", {})
            ach = ap.get("achieved_sparsity", rnd.get("achieved_sparsity"))
            lines.append(f"| {TYPE_LABELS[t]} | {s:.0%} | {_fmt(ap.get('bleu'))} | {_fmt(rnd.get('bleu'))} | "
                         f"{_fmt(ap.get('bleu_zero_shot'))} | {_fmt(rnd.get('bleu_zero_shot'))} | "
                         f"{'-' if ach is None else f'{ach:.3f}'} |")
    lines += ["", "`achieved`: sparsity over the attendable entries of the pruned type's sites.", "",
              f"Device: {device_label(results['env'])}; torch {results['env'].get('torch')}, transformers "
              f"{results['env'].get('transformers')}; {results['env'].get('date_utc', results['env'].get('date'))}; total "
              f"{results.get('seconds_total', 0):.0f} s."]
    return "\n".join(lines) + "\n"


def device_label(env: dict) -> str:
    """``"CPU (2 cores)"`` or the GPU's name, from an environment record (``report.environment()``
    keys; the ``device`` label of older results files is kept as it was)."""
    dev = str(env.get("device") or "")
    if dev.startswith("cuda"):
        return env.get("gpu") or dev
    if dev == "cpu":
        return f"CPU ({env.get('cpu_count')} cores)"
    return dev or "?"


def _try_plots(fn, log) -> None:
    try:
        fn()
    except MissingDependencyError as e:  # e.g. no matplotlib on the GPU machine: plot later with write_plots
        log(f"plots skipped ({e}); make them later with `attnprune translate --plots-only --out DIR`")


def write_plots(out_dir: str | os.PathLike) -> list[Path]:
    """(Re)make the PNG plots of a finished or interrupted experiment from its ``stats.safetensors``
    and ``results.json``. Returns the files written."""
    from ..stats import AttentionStats

    out = Path(out_dir)
    written = []
    if (out / "stats.safetensors").is_file():
        stats = AttentionStats.load(out / "stats.safetensors")
        plot_patterns(stats, out / "attention_patterns.png")
        plot_offsets(stats, out / "attention_offsets.png")
        written += [out / "attention_patterns.png", out / "attention_offsets.png"]
    if (out / "results.json").is_file():
        plot_bleu(json.loads((out / "results.json").read_text()), out / "bleu.png")
        written.append(out / "bleu.png")
    if not written:
        raise InvalidArgumentError(f"{out}: no stats.safetensors or results.json to plot from")
    return written
