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
from ..policies import check_sparsity, make_mask, uses_scores

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


def _grid_mass(stats) -> dict[str, torch.Tensor]:
    """Per site: the observed attention mass on the stats' ``g``-grid, float [H, Qg, Kg] (0 where never
    observed): the mean of each entry at token level; at ``g > 1`` each cell's mean times its attendable
    entries (the policies' block score, ``site_units``), i.e. the cell's share of the token means."""
    from ..units import site_units

    g = int(getattr(stats, "granularity", 1) or 1)
    if g == 1:
        return {site: torch.nan_to_num(stats.mean(site).float(), nan=0.0) for site in stats.sites}
    return {site: torch.nan_to_num(site_units(stats, site, g).score, nan=0.0) for site in stats.sites}


def _grid_keep(mask, site: str, g: int) -> torch.Tensor:
    """bool keep of ``mask``'s ``site`` on a ``g``-grid (its blocks repeated when they are a multiple of g)."""
    sm = mask.site(site) if hasattr(mask, "site") else None
    if sm is None or g == 1:
        return mask[site]  # token level (a block mask expanded)
    b = sm.block or 1
    if b % g:
        raise InvalidArgumentError(f"site {site!r}: mask block {b} is not a multiple of the stats granularity {g}")
    f = b // g
    return sm.keep.repeat_interleave(f, 1).repeat_interleave(f, 2)


def kept_mass(stats, mask, *, means: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Share of the observed attention mass each site keeps under ``mask``.

    For every site: ``sum(mass * keep) / sum(mass)`` over the stats' grid, where ``mass`` is the
    observed mean of each entry (for stats at granularity ``g > 1``: of each ``g x g`` cell, times
    its entries; the same as expanding the cells' means to token level) and ``keep`` is
    ``mask[site]`` on that grid, cropped to it. ``means``: ``_grid_mass(stats)``, precomputed when
    called for many masks. Memory: one grid per site (no token-level expansion of block stats).
    """
    means = means if means is not None else _grid_mass(stats)
    g = int(getattr(stats, "granularity", 1) or 1)
    out = {}
    for site in mask.sites:
        m = means[site]
        keep = _grid_keep(mask, site, g)
        q, k = min(m.shape[1], keep.shape[1]), min(m.shape[2], keep.shape[2])
        m, keep = m[:, :q, :k], keep[:, :q, :k]
        tot = float(m.sum(dtype=torch.float64))
        out[site] = float((m * keep).sum(dtype=torch.float64)) / tot if tot > 0 else float("nan")
    return out


def observe_granularity(blocks) -> int:
    """The granularity a sweep over ``blocks`` observes at: 1 when token level is among them, else
    the greatest common divisor of the block sizes (block statistics stay small at long lengths)."""
    if any(b is None for b in blocks) or not blocks:
        return 1
    return math.gcd(*(int(b) for b in blocks))


@dataclass
class SweepConfig:
    """What a sweep runs. ``blocks``: ``None`` for token level, an int ``b`` for ``b x b`` blocks."""

    sparsities: tuple[float, ...] = DEFAULT_SPARSITIES
    policies: tuple[str, ...] = DEFAULT_POLICIES
    blocks: tuple[int | None, ...] = (None, 16)
    seed: int = 0
    backend: str = "reference"
    beyond: str = "error"
    scores: tuple[str, ...] = ("prob",)
    ablation_batches: int | None = None  # score "ablation" profiles the first N calibration batches (None: all)
    ablation_base: int | None = None  # score "ablation" around a band of this many blocks (None: the dense model)
    ablation_widths: tuple[int, ...] | None = None  # score "ablation": band widths profiled (None: ablation.GRID)

    def __post_init__(self):
        from ..ablation import check_profile_arguments
        from ..observe import SCORES

        for s in self.sparsities:
            check_sparsity(s)
        bad = [s for s in self.scores if s not in SCORES]
        if bad or not self.scores:
            raise InvalidArgumentError(f"scores must be some of {', '.join(SCORES)}, got {list(self.scores)}")
        for b in self.blocks:
            if b is not None and int(b) < 1:
                raise InvalidArgumentError(f"block size {b} must be a positive integer (or None for token level)")
        n = self.ablation_batches
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise InvalidArgumentError(f"ablation_batches must be a positive integer (or None for all), got {n!r}")
        check_profile_arguments(self.ablation_base, self.ablation_widths, prefix="ablation_")
        if "ablation" in self.scores and observe_granularity(self.blocks) < 2:
            raise InvalidArgumentError("score 'ablation' measures bands of blocks: give only block sizes (e.g. "
                                       "--blocks 64 128), no token level, with a common divisor of at least 2")


@dataclass
class SweepResult:
    """Every number of a sweep. ``runs``: one dict per (score, granularity, policy, sparsity) with keys
    ``score`` (what ranked the mask), ``block``, ``policy``, ``sparsity`` (target), ``achieved`` (attendable convention),
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
    extra_dense: dict = field(default_factory=dict)  # {test set name: {"value", "nll", "count"}}

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
          keep_masks: bool = False, extra_tests: dict[str, Sequence] | None = None):
    """Quality versus sparsity: dense baseline, then masks over scores x blocks x policies x sparsities.

    model: what is measured (returns logits); observe_model: the module to observe and mask
        (default ``model``; e.g. ``clf.encoder`` for an ``EncoderClassifier``).
    calib_batches / test_batches: re-iterable sequences of batches (dicts of model keyword
        arguments; ``labels: [batch]`` for classification), disjoint (checked).
    task: ``"causal-lm"`` (perplexity) or ``"classification"`` (accuracy).
    stats: an ``AttentionStats`` already observed on ``calib_batches`` (skips observing its score).
        Otherwise every score of ``config.scores`` is observed once, at granularity
        ``observe_granularity(config.blocks)``.
    description: what the calibration data is (stored in the stats and masks).
    on_run: called with every run's dict as soon as it is measured (e.g. to print it).
    on_stats: called with each ``AttentionStats`` right after its observation (e.g. to save it).
    on_dense: called with the dense ``MetricResult`` as soon as it is measured.
    keep_masks: return every mask built (they can take much memory: one bool per head and entry).
    extra_tests: ``{name: batches}`` measured too, dense and under every mask (e.g. text of another
        domain than the calibration data); each run then has ``extra[name] = {"value", "nll", "count"}``
        and the result's ``extra_dense[name]`` the dense numbers.
    Returns ``(SweepResult, stats, masks)``: ``stats`` the first score's ``AttentionStats``,
    ``masks`` maps ``(score, block, policy, sparsity)`` to the ``PruneMask`` (empty unless ``keep_masks``).
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
    extra_tests = dict(extra_tests or {})
    check_disjoint(calib_batches, test_batches)
    for name, batches in extra_tests.items():
        if not batches:
            raise EmptyDatasetError(f"sweep: no batches in the extra test set {name!r}")
        check_disjoint(calib_batches, batches)
    if stats is not None and stats.score not in config.scores:
        raise InvalidArgumentError(f"the stats given hold score {stats.score!r}, which is not among the "
                                   f"sweep's scores {list(config.scores)}")
    timings: dict[str, float] = {}

    def measure_all(desc: str):
        torch.manual_seed(config.seed)
        main = measure(model, test_batches, progress=progress, desc=desc)
        extra = {}
        for name, batches in extra_tests.items():
            torch.manual_seed(config.seed)
            extra[name] = measure(model, batches, progress=progress, desc=f"{desc} [{name}]")
        return main, extra

    dense, dense_extra = measure_all("dense")
    timings["dense_eval_s"] = dense.seconds + sum(r.seconds for r in dense_extra.values())
    if on_dense is not None:
        on_dense(dense)

    observed = {stats.score: stats} if stats is not None else {}
    g = observe_granularity(config.blocks) if stats is None else stats.granularity
    for score in config.scores:
        if score in observed:
            continue
        t0 = time.perf_counter()
        obs_batches = [model_inputs(b) for b in calib_batches]
        if score == "ablation":
            from ..ablation import measure_bands

            observed[score] = measure_bands(target, obs_batches[:config.ablation_batches], granularity=g,
                                            widths=config.ablation_widths, base=config.ablation_base,
                                            progress=progress, description=description)
        else:
            observed[score] = observe(target, obs_batches, granularity=g, progress=progress,
                                      description=description, score=score)
        timings["observe_s" if score == "prob" else f"observe_{score}_s"] = time.perf_counter() - t0
        if on_stats is not None:
            on_stats(observed[score])

    result = SweepResult(model=model_name, task=task, metric=metric, dense=dense.to_dict(),
                         config=asdict(config), data=dict(data_info or {}), timings=timings,
                         extra_dense={k: _short(v) for k, v in dense_extra.items()})
    masks: dict = {}
    means = _grid_mass(observed["prob"]) if "prob" in observed else None
    combos = [(sc, b, p, s) for sc in config.scores for b in config.blocks for p in config.policies
              for s in config.sparsities if sc == config.scores[0] or uses_scores(p)]
    t_masks, t_evals = 0.0, 0.0
    for score, block, policy, sp in progress_bar(combos, progress, "sweep"):
        st = observed[score]
        t0 = time.perf_counter()
        mask = make_mask(st, float(sp), policy=policy, block=block, seed=config.seed)
        t_masks += time.perf_counter() - t0
        if keep_masks:
            masks[(score, block, policy, float(sp))] = mask
        label = f"{policy}" + ("" if score == "prob" else f" {score}") + f" {sp:g}" + (f" b{block}" if block else "")
        with apply(target, mask, backend=config.backend, beyond=config.beyond):
            r, extra = measure_all(label)
        t_evals += r.seconds + sum(x.seconds for x in extra.values())
        achieved, paper = _achieved(mask)
        # kept share of the *probability* mass (observed once with score "prob"), whatever ranked the mask
        km = kept_mass(observed["prob"], mask, means=means) if means is not None else {}
        finite = [v for v in km.values() if not math.isnan(v)]
        run = {
            "score": score, "block": block, "policy": policy, "sparsity": float(sp),
            "achieved": achieved, "achieved_paper": paper,
            "value": r.value, "delta": r.value - dense.value,
            "nll": r.nll, "count": r.count, "correct": r.correct,
            "kept_mass": km, "mean_kept_mass": sum(finite) / len(finite) if finite else None,
            "seconds": r.seconds,
        }
        if extra:
            run["extra"] = {k: _short(v) for k, v in extra.items()}
        result.runs.append(run)
        if on_run is not None:
            on_run(run)
    timings["make_mask_s"] = t_masks
    timings["masked_eval_s"] = t_evals
    return result, observed[config.scores[0]], masks


def _short(r: MetricResult) -> dict:
    return {"value": r.value, "nll": r.nll, "count": r.count}
