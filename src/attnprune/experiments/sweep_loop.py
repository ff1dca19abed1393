"""The quality-versus-sparsity sweep: one dense baseline, one observation, then a mask for every
granularity x policy x sparsity, each measured under ``apply``.

``sweep(model, calib_batches, test_batches, task=...)`` measures the dense model, observes
attention on the calibration batches once, and for every granularity (token level, or ``b x b``
blocks), policy and sparsity builds a mask with ``make_mask`` and measures the model under
``apply``. Calibration and test batches must not share a sequence (checked). Seeds are fixed: the
random policy uses ``seed``, and the global torch RNG is seeded before every measurement.
The metrics come from the library (``attnprune.evaluate``); ``experiments/sweep.py`` (``run_eval``,
behind ``attnprune eval`` and ``attnprune demo``) drives this loop from settings and writes the report.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn

from ..errors import EmptyDatasetError, InvalidArgumentError
from ..evaluate import HIGHER_IS_BETTER, METRICS, TASK_METRICS, MetricResult, model_inputs, progress_bar
from ..apply import apply
from ..observe import observe
from ..policies import check_sparsity, make_mask

DEFAULT_SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)
DEFAULT_POLICIES = ("layer", "head", "global", "random")


def _row_hashes(batches: Iterable) -> set[str]:
    """SHA-1 of every row's unpadded token ids."""
    out = set()
    for b in batches:
        ids = b if isinstance(b, torch.Tensor) else b["input_ids"]
        am = None if isinstance(b, torch.Tensor) else b.get("attention_mask")
        for r in range(ids.shape[0]):
            row = ids[r] if am is None else ids[r][am[r].bool()]
            out.add(hashlib.sha1(row.cpu().numpy().tobytes()).hexdigest())
    return out


def check_disjoint(calib: Iterable, test: Iterable) -> None:
    """Raise ``InvalidArgumentError`` if a calibration sequence also appears in the test batches
    (compared on the unpadded token ids of every row)."""
    shared = _row_hashes(calib) & _row_hashes(test)
    if shared:
        raise InvalidArgumentError(
            f"{len(shared)} sequence(s) appear in both the calibration and the test data; "
            "calibrate and evaluate on disjoint splits")


def _token_means(stats) -> dict[str, torch.Tensor]:
    """Per site: ``stats.mean(site)`` at token level with NaN (never observed) as 0, float32 [H, Q, K]."""
    out = {}
    for site in stats.sites:
        mean = stats.mean(site).float()
        if stats.granularity > 1:
            g = stats.granularity
            mean = mean.repeat_interleave(g, 1).repeat_interleave(g, 2)
            mean = mean[:, :stats.q_len(site), :stats.k_len(site)]
        out[site] = torch.nan_to_num(mean, nan=0.0)
    return out


def kept_mass(stats, mask, *, means: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Share of the observed attention mass each site keeps under ``mask``.

    For every site: ``sum(mean * keep) / sum(mean)`` over observed entries, where ``mean`` is
    ``stats.mean(site): [H, Q, K]`` at token level and ``keep`` is ``mask[site]`` cropped to it.
    Block-level stats are expanded to their blocks' mean. ``means``: the token-level means,
    precomputed (``_token_means(stats)``) when called for many masks.
    """
    means = means if means is not None else _token_means(stats)
    out = {}
    for site in mask.sites:
        m = means[site]
        keep = mask[site]
        q, k = min(m.shape[1], keep.shape[1]), min(m.shape[2], keep.shape[2])
        m, keep = m[:, :q, :k], keep[:, :q, :k]
        tot = float(m.sum(dtype=torch.float64))
        out[site] = float((m * keep).sum(dtype=torch.float64)) / tot if tot > 0 else float("nan")
    return out


@dataclass
class SweepConfig:
    """What a sweep runs. ``blocks``: ``None`` for token level, an int ``b`` for ``b x b`` blocks."""

    sparsities: tuple[float, ...] = DEFAULT_SPARSITIES
    policies: tuple[str, ...] = DEFAULT_POLICIES
    blocks: tuple[int | None, ...] = (None, 16)
    seed: int = 0
    backend: str = "reference"
    beyond: str = "error"

    def __post_init__(self):
        for s in self.sparsities:
            check_sparsity(s)
        for b in self.blocks:
            if b is not None and int(b) < 1:
                raise InvalidArgumentError(f"block size {b} must be a positive integer (or None for token level)")


@dataclass
class SweepResult:
    """Every number of a sweep. ``runs``: one dict per (granularity, policy, sparsity) with keys
    ``block``, ``policy``, ``sparsity`` (target), ``achieved`` (attendable convention),
    ``achieved_paper`` (causal zeros counted, when the mask reports it), ``value``, ``delta``
    (value - dense value), ``kept_mass`` (per site), ``mean_kept_mass``, ``seconds``."""

    model: str
    task: str
    metric: str
    dense: dict
    runs: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    @property
    def higher_is_better(self) -> bool:
        return HIGHER_IS_BETTER[self.metric]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["higher_is_better"] = self.higher_is_better
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SweepResult":
        d = {k: v for k, v in d.items() if k in {f for f in cls.__dataclass_fields__}}
        return cls(**d)


def _achieved(mask) -> tuple[float | None, float | None]:
    """(attendable sparsity, paper-convention sparsity) over the whole mask, from its metadata.

    The paper's convention counts causal-future entries as pruned; per site it is
    ``meta["sites"][site]["paper_sparsity"]``, pooled here over sites by entry counts."""
    meta = getattr(mask, "meta", {}) or {}
    a = meta.get("sparsity")
    kept, total = 0.0, 0.0
    for s in (meta.get("sites") or {}).values():
        ps, k = s.get("paper_sparsity"), s.get("kept_entries")
        if ps is None or k is None or ps >= 1.0:
            continue
        kept += k
        total += k / (1.0 - ps)
    p = 1.0 - kept / total if total > 0 else None
    return (float(a) if a is not None else None, p)


def sweep(model: nn.Module, calib_batches: Sequence, test_batches: Sequence, *, task: str = "causal-lm",
          config: SweepConfig | None = None, stats=None, observe_model: nn.Module | None = None,
          model_name: str = "", data_info: dict | None = None, description: str = "",
          progress: bool = True, on_run: Callable[[dict], None] | None = None,
          on_stats: Callable[[Any], None] | None = None, on_dense: Callable[[MetricResult], None] | None = None,
          keep_masks: bool = False):
    """Quality versus sparsity: dense baseline, then masks over blocks x policies x sparsities.

    model: what is measured (returns logits); observe_model: the module to observe and mask
        (default ``model``; e.g. ``clf.encoder`` for an ``EncoderClassifier``).
    calib_batches / test_batches: re-iterable sequences of batches (dicts of model keyword
        arguments; ``labels: [batch]`` for classification), disjoint (checked).
    task: ``"causal-lm"`` (perplexity) or ``"classification"`` (accuracy).
    stats: an ``AttentionStats`` already observed on ``calib_batches`` (skips observation).
    description: what the calibration data is (stored in the stats and masks).
    on_run: called with every run's dict as soon as it is measured (e.g. to print it).
    on_stats: called with the ``AttentionStats`` right after observation (e.g. to save them).
    on_dense: called with the dense ``MetricResult`` as soon as it is measured.
    keep_masks: return every mask built (they can take much memory: one bool per head and entry).
    Returns ``(SweepResult, AttentionStats, masks)`` where ``masks`` maps
    ``(block, policy, sparsity)`` to the ``PruneMask`` used (empty unless ``keep_masks``).
    """
    if task not in TASK_METRICS:
        raise InvalidArgumentError(f"unknown task {task!r}; known: {', '.join(TASK_METRICS)}")
    config = config or SweepConfig()
    metric = TASK_METRICS[task]
    measure = METRICS[metric]
    target = observe_model if observe_model is not None else model
    if not calib_batches:
        raise EmptyDatasetError("sweep: no calibration batches")
    if not test_batches:
        raise EmptyDatasetError("sweep: no test batches")
    check_disjoint(calib_batches, test_batches)
    timings: dict[str, float] = {}

    torch.manual_seed(config.seed)
    dense = measure(model, test_batches, progress=progress, desc="dense")
    timings["dense_eval_s"] = dense.seconds
    if on_dense is not None:
        on_dense(dense)

    if stats is None:
        t0 = time.perf_counter()
        obs_batches = [model_inputs(b) for b in calib_batches]
        stats = observe(target, obs_batches, granularity=1, progress=progress, description=description)
        timings["observe_s"] = time.perf_counter() - t0
        if on_stats is not None:
            on_stats(stats)

    result = SweepResult(model=model_name, task=task, metric=metric, dense=dense.to_dict(),
                         config=asdict(config), data=dict(data_info or {}), timings=timings)
    masks: dict = {}
    means = _token_means(stats)
    combos = [(b, p, s) for b in config.blocks for p in config.policies for s in config.sparsities]
    t_masks, t_evals = 0.0, 0.0
    for block, policy, sp in progress_bar(combos, progress, "sweep"):
        t0 = time.perf_counter()
        mask = make_mask(stats, float(sp), policy=policy, block=block, seed=config.seed)
        t_masks += time.perf_counter() - t0
        if keep_masks:
            masks[(block, policy, float(sp))] = mask
        torch.manual_seed(config.seed)
        with apply(target, mask, backend=config.backend, beyond=config.beyond):
            r = measure(model, test_batches, progress=progress,
                        desc=f"{policy} {sp:g}" + (f" b{block}" if block else ""))
        t_evals += r.seconds
        achieved, paper = _achieved(mask)
        km = kept_mass(stats, mask, means=means)
        finite = [v for v in km.values() if not math.isnan(v)]
        run = {
            "block": block, "policy": policy, "sparsity": float(sp),
            "achieved": achieved, "achieved_paper": paper,
            "value": r.value, "delta": r.value - dense.value,
            "nll": r.nll, "count": r.count, "correct": r.correct,
            "kept_mass": km, "mean_kept_mass": sum(finite) / len(finite) if finite else None,
            "seconds": r.seconds,
        }
        result.runs.append(run)
        if on_run is not None:
            on_run(run)
    timings["make_mask_s"] = t_masks
    timings["masked_eval_s"] = t_evals
    return result, stats, masks
