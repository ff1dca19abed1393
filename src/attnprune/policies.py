"""Mask policies: which attention entries (or blocks) to keep, given observed mean probabilities.

``make_mask(stats, sparsity, policy=..., block=...)`` turns ``AttentionStats`` into a ``PruneMask``.

How selection works (all policies)
----------------------------------
Each site is cut into *units*: token entries, or ``b x b`` blocks when ``block=b`` (or when the
stats were accumulated at granularity ``g > 1`` and ``block`` is left out: then ``b = g``).
Every unit has

* a **score**: its attention mass, the sum of the mean probabilities of the token entries in it
  (for a token unit, simply its mean probability);
* a **weight**: the number of *attendable* token entries in it. An entry is attendable when it was
  observed at least once (``stats.mean`` is not NaN); causal-future entries never are. At
  granularity ``g > 1`` the weight of an observed ``g x g`` block is its geometric number of
  entries inside the observed lengths (under causality only ``key <= query``).

Sparsity is counted over attendable token entries: ``1 - kept weight / total weight``. A policy
keeps ``N - floor(sparsity * N)`` of the ``N`` attendable entries of its pool (for blocks: whole
blocks, greedily in order, until at least that many entries are kept, so the achieved sparsity is
at most the target and is exactly what a block kernel skips).

Ordering: units with a higher score first; ties broken by position (earlier site under ``global``,
then lower head, query, key index first), so results are deterministic. ``random`` orders units by a seeded random draw.

Row guarantee: every query row (token row, or block row) of a head that has any attendable unit
keeps at least one: its highest-scoring unit (the first one on ties); under ``random`` a uniformly
random attendable unit of the row. These are kept first and count towards the budget; only if
there are more such rows than the budget allows does a site keep more than asked. At block level
the guarantee is per block row; since a causal block row's kept block is on or below the diagonal,
every observed token row in it still has a kept attendable key. (A block row needs a block, so at
short lengths high block sparsities can be out of reach; the achieved value is reported.)

Policies (registry ``POLICIES``)
--------------------------------
* ``layer``: the paper's rule: one threshold per site, pooled over its heads and positions.
* ``head``: one threshold per head of each site.
* ``global``: one threshold for the whole model (all sites pooled).
* ``random``: the paper's control: per site as many kept entries as ``layer`` keeps, placed
  uniformly at random among attendable units (seeded by ``seed``).
* ``structured``: sink columns and a local band kept as fixed structure (at most half the site's
  budget), the rest by score as ``layer`` (StreamingLLM / MoA-style structure, data-filled).
* ``structured-global``: ``structured``'s sinks and band per site, the rest of the model's budget on
  one threshold over all sites and heads (a model-wide per-head allocation, as MoA allocates).
* ``streaming``: the data-free control of that structure: sink columns, then the diagonals nearest
  the main one until the site's budget (StreamingLLM's sink + recent window at equal budget).
* ``elastic`` (``attnprune.policy_elastic``): structure only, as ``streaming``, but sized per head from
  the data: each head's sink columns and band width by one model-wide allocation of kept score mass;
  ``elastic-site``: the same allocation within each site's own budget; ``elastic-floor``: the
  allocation above ``streaming``'s whole diagonals (no head narrower than its site's uniform band).

Entries that are not attendable are never kept (``False``) in token-level masks. A kept block
keeps all of its entries, causal-future ones on the diagonal included; the backend applies causality.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from .errors import InvalidArgumentError
from .registry import Registry
from .units import Units, geometric_weight, resolve_block, site_units  # noqa: F401  (re-exported)


# A policy maps (units of every site, sparsity, generator) to bool keep tensors [H, R, C], one per site.
Policy = Callable[[list[Units], float, torch.Generator], list[torch.Tensor]]
POLICIES: Registry[Policy] = Registry("policy")


def budget(total: float, sparsity: float) -> float:
    """Attendable entries to keep out of ``total``: ``total - floor(sparsity * total)``."""
    return total - math.floor(sparsity * total + 1e-9)


def row_best(u: Units) -> torch.Tensor:
    """bool [H, R, C]: the highest-scoring attendable unit of every row that has one (first on ties)."""
    att = u.attendable
    return _one_per_row(u.score.masked_fill(~att, -math.inf), att)


def row_random(u: Units, gen: torch.Generator) -> torch.Tensor:
    """bool [H, R, C]: one uniformly random attendable unit per row that has one."""
    att = u.attendable
    draw = torch.rand(u.score.shape, generator=gen, dtype=torch.float64)
    return _one_per_row(draw.masked_fill_(~att, -1.0), att)


def _one_per_row(score: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
    forced = torch.zeros_like(att)
    if score.numel() == 0:
        return forced
    arg = score.argmax(dim=-1, keepdim=True)  # first maximum on ties
    forced.scatter_(-1, arg, att.any(dim=-1, keepdim=True))
    return forced


def select(key: torch.Tensor, weight: torch.Tensor, forced: torch.Tensor, target: float) -> torch.Tensor:
    """Keep units in descending ``key`` order until their weight reaches ``target``.

    key, weight, forced: flat tensors [N]; units with ``weight == 0`` are never kept, ``forced``
    ones always (first). Ties in ``key`` go to the lower index. Returns bool [N].
    """
    keep = torch.zeros(weight.shape, dtype=torch.bool)
    idx = (weight > 0).nonzero().squeeze(1)
    if idx.numel() == 0:
        return keep
    k = key[idx]  # a fresh copy: safe to modify in place
    f = forced[idx]
    k.masked_fill_(f, math.inf)
    n_forced = int(f.sum())
    w = weight[idx]
    if bool((w == 1).all()):  # token units: a k-th value threshold, no full sort
        return _top_n(keep, idx, k, _token_n(target, k.numel(), n_forced))
    order = torch.argsort(k, descending=True, stable=True)
    cum = torch.cumsum(w[order].to(torch.float64), 0)
    n = int(torch.searchsorted(cum, torch.tensor([target], dtype=cum.dtype)).item()) + 1
    n = max(min(n, order.numel()), n_forced)
    keep[idx[order[:n]]] = True
    return keep


def _token_n(target: float, n_attendable: int, n_forced: int) -> int:
    """Token units kept by ``select``: ``target`` rounded up, within [n_forced, n_attendable]."""
    return max(min(math.ceil(target - 1e-9), n_attendable), n_forced)


def _top_n(keep: torch.Tensor, idx: torch.Tensor, k: torch.Tensor, n: int) -> torch.Tensor:
    """Set ``keep[idx[i]]`` for the ``n`` largest ``k[i]`` (ties: lower ``i`` first)."""
    if n >= k.numel():
        keep[idx] = True
        return keep
    if n <= 0:
        return keep
    thr = _nth_largest(k, n)
    sel = k > thr
    ties = (k == thr).nonzero().squeeze(1)[: n - int(sel.sum())]
    sel[ties] = True
    keep[idx[sel]] = True
    return keep


def _nth_largest(k: torch.Tensor, n: int):
    """The ``n``-th largest value of flat ``k`` (1 <= n <= k.numel()), as ``torch.kthvalue`` gives it.

    On CPU float32/float64 without NaN, numpy's introselect (``np.partition``) finds the same
    element several times faster than ``torch.kthvalue``; anything else goes to ``torch.kthvalue``.
    """
    pos = k.numel() - n  # 0-based position in ascending order
    if (k.device.type == "cpu" and k.dtype in (torch.float32, torch.float64) and k.is_contiguous()
            and not bool(torch.isnan(k).any())):
        a = k.numpy()
        return torch.tensor(np.partition(a, pos)[pos], dtype=k.dtype)
    return torch.kthvalue(k, pos + 1).values


def _total(weight: torch.Tensor) -> float:
    return float(weight.sum(dtype=torch.float64))


def _is_token(u: Units) -> bool:
    """True when every attendable unit has weight 1 (``select`` then takes its token path)."""
    w = u.weight
    return bool(((w == 0) | (w == 1)).all()) and bool((w > 0).any())


def _layer_one(u: Units, sparsity: float) -> torch.Tensor:
    target = budget(_total(u.weight), sparsity)
    return select(u.score.flatten(), u.weight.flatten(), row_best(u).flatten(), target).view(u.score.shape)


@POLICIES.register("layer")
def layer_policy(units: list[Units], sparsity: float, gen: torch.Generator) -> list[torch.Tensor]:
    """One threshold per site over all its heads and positions (the paper's rule)."""
    return [_layer_one(u, sparsity) for u in units]


@POLICIES.register("head")
def head_policy(units: list[Units], sparsity: float, gen: torch.Generator) -> list[torch.Tensor]:
    """One threshold per head: every head keeps the same fraction of its attendable entries."""
    out = []
    for u in units:
        forced = row_best(u)
        keep = torch.zeros(u.score.shape, dtype=torch.bool)
        for h in range(u.score.shape[0]):
            target = budget(_total(u.weight[h]), sparsity)
            keep[h] = select(u.score[h].flatten(), u.weight[h].flatten(), forced[h].flatten(),
                             target).view(u.score.shape[1:])
        out.append(keep)
    return out


@POLICIES.register("global")
def global_policy(units: list[Units], sparsity: float, gen: torch.Generator) -> list[torch.Tensor]:
    """One threshold for the whole model: all sites' units pooled."""
    if not units:
        return []
    key = torch.cat([u.score.flatten() for u in units])
    weight = torch.cat([u.weight.flatten() for u in units])
    forced = torch.cat([row_best(u).flatten() for u in units])
    keep = select(key, weight, forced, budget(_total(weight), sparsity))
    return [part.view(u.score.shape) for part, u in zip(keep.split([u.score.numel() for u in units]), units)]


@POLICIES.register("random")
def random_policy(units: list[Units], sparsity: float, gen: torch.Generator) -> list[torch.Tensor]:
    """The paper's control: per site the weight ``layer`` keeps, placed uniformly at random."""
    out = []
    for u in units:
        if _is_token(u):
            # the weight ``layer`` keeps at token level, counted without running its selection:
            # ``select`` keeps exactly ``_token_n`` weight-1 units, clipped to [0, attendable]
            att = u.attendable
            n_att = int(att.sum())
            n_forced = int((row_best(u) & att).sum())
            n = _token_n(budget(_total(u.weight), sparsity), n_att, n_forced)
            target = float(min(max(n, 0), n_att))
        else:
            target = _total(u.weight[_layer_one(u, sparsity)])
        forced = row_random(u, gen)
        draw = torch.rand(u.score.shape, generator=gen, dtype=torch.float64)
        out.append(select(draw.flatten(), u.weight.flatten(), forced.flatten(), target).view(u.score.shape))
    return out


SINK_TOKENS = 4  # ``structured``: leading key columns always kept (at least one unit)
BAND_SHARE = 0.5  # ``structured``: at most this share of a site's budget goes to sinks + local band


def _band_width(u: Units, sink: torch.Tensor, cap: float) -> int:
    """Widest local band (in units: ``0 <= r - c < w``, or ``|r - c| < w`` for non-causal sites) whose
    attendable weight, with the sink columns', stays within ``cap`` (at least 1: the diagonal)."""
    w = torch.where(sink, 0.0, u.weight.to(torch.float64))
    R, C = w.shape[1:]
    per = []
    for d in range(min(R, C)):  # weight on each diagonal offset below (and above) the main one
        tot = float(w.diagonal(-d, dim1=1, dim2=2).sum()) if d < R else 0.0
        if u.kind != "causal" and d:
            tot += float(w.diagonal(d, dim1=1, dim2=2).sum())
        per.append(tot)
    used = _total(u.weight[sink])
    width = 0
    for tot in per:
        if used + tot > cap and width >= 1:
            break
        used, width = used + tot, width + 1
    return width


def _structure(u: Units, target: float) -> torch.Tensor:
    """``structured``'s fixed part of a site: bool [H, R, C] sink columns, the widest local band within
    ``BAND_SHARE * target`` and the row guarantee."""
    att = u.attendable
    R, C = u.score.shape[1:]
    cols = torch.arange(C)[None, None, :]
    sink = (cols < max(1, math.ceil(SINK_TOKENS / u.unit))) & att
    w = _band_width(u, sink, BAND_SHARE * target)
    d = torch.arange(R)[None, :, None] - cols
    band = ((d >= 0) & (d < w) if u.kind == "causal" else d.abs() < w) & att
    return sink | band | row_best(u)


@POLICIES.register("structured")
def structured_policy(units: list[Units], sparsity: float, gen: torch.Generator) -> list[torch.Tensor]:
    """Sink columns and a local band kept as fixed structure, the rest of each site's budget by score.

    Per site: the first ``SINK_TOKENS`` key positions (at least one unit column) and the widest band
    around the diagonal whose weight, with the sinks', is at most ``BAND_SHARE`` of the site's budget
    are kept first (with the row guarantee); the remaining budget goes to the highest-scoring units
    of the site pooled over its heads, as ``layer`` does.
    """
    out = []
    for u in units:
        target = budget(_total(u.weight), sparsity)
        forced = _structure(u, target)
        out.append(select(u.score.flatten(), u.weight.flatten(), forced.flatten(), target).view(u.score.shape))
    return out


@POLICIES.register("structured-global")
def structured_global_policy(units: list[Units], sparsity: float, gen: torch.Generator) -> list[torch.Tensor]:
    """``structured``'s fixed part per site, the rest of the *model's* budget by score over all sites.

    One model-wide allocation: every site keeps its sinks and band (sized from its own budget, as in
    ``structured``), then the units of all sites and heads compete for the remaining budget on one
    threshold (as ``global`` does), so a site or head whose scores are high gets more than its share.
    With ``observe(score="loss")`` (or ``"influence"``) the scores are first-order loss changes, comparable across sites.
    """
    if not units:
        return []
    forced = [_structure(u, budget(_total(u.weight), sparsity)) for u in units]
    key = torch.cat([u.score.flatten() for u in units])
    weight = torch.cat([u.weight.flatten() for u in units])
    keep = select(key, weight, torch.cat([f.flatten() for f in forced]), budget(_total(weight), sparsity))
    return [part.view(u.score.shape) for part, u in zip(keep.split([u.score.numel() for u in units]), units)]


@POLICIES.register("streaming")
def streaming_policy(units: list[Units], sparsity: float, gen: torch.Generator) -> list[torch.Tensor]:
    """A data-free baseline (StreamingLLM-style): per site the sink columns and the diagonal, then the
    diagonals nearest the main one (``r - c`` for causal sites, ``|r - c|`` otherwise), until the
    site's budget is kept (sinks and diagonal are kept even when they alone exceed it, as in ``structured``).

    Units are kept in order of distance to the diagonal, earlier heads / rows / keys first on ties,
    so the last diagonal taken may be partial; the scores are not used.
    """
    out = []
    for u in units:
        H, R, C = u.score.shape
        att = u.attendable
        cols = torch.arange(C)[None, None, :]
        sink = (cols < max(1, math.ceil(SINK_TOKENS / u.unit))) & att
        d = torch.arange(R)[None, :, None] - cols
        key = -(d if u.kind == "causal" else d.abs()).to(torch.float64).expand(H, R, C)
        target = budget(_total(u.weight), sparsity)
        forced = sink | ((d == 0) & att)  # as ``structured``: sinks and the diagonal even past the budget
        out.append(select(key.flatten(), u.weight.flatten(), forced.flatten(), target).view(H, R, C))
    return out


streaming_policy.uses_scores = False  # the sweep builds it once, not once per score


def uses_scores(policy: str) -> bool:
    """Whether the policy's masks depend on the observed scores (``streaming`` does not)."""
    return getattr(POLICIES.get(policy), "uses_scores", True)


def check_sparsity(sparsity) -> float:
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from None
    if not (0.0 <= s < 1.0):  # also rejects NaN
        raise InvalidArgumentError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return s


LENGTH_FREE = ("stats", "mask")  # where make_mask's masks take their form past the calibrated length


def make_mask(stats, sparsity: float, *, policy: str = "layer", block: int | None = None,
              seed: int = 0, length_free: str = "stats"):
    """Derive a ``PruneMask`` from observed attention.

    stats: ``AttentionStats``; ``stats.mean(site)`` is float [H, Qg, Kg] at granularity g.
    sparsity: fraction of attendable entries to prune, in [0, 1).
    policy: a name of ``POLICIES``: ``"layer"`` (paper), ``"head"``, ``"global"``, ``"random"``,
        ``"structured"``, ``"structured-global"``, ``"streaming"`` (see module docs), ``"elastic"``,
        ``"elastic-site"``, ``"elastic-floor"`` (``attnprune.policy_elastic``).
    block: select whole ``block x block`` blocks (must be a multiple of ``stats.granularity``);
        default: token level for token stats, ``g`` for stats at granularity ``g > 1``.
    seed: seeds ``random``.
    length_free: how each site continues past its calibrated lengths (``beyond="extend"``,
        ``PrunedKVCache``, ``PruneMask.extend``): ``"stats"`` (default) sinks and a band fitted from
        ``stats`` to keep, per head, the share of each row's attention mass the mask keeps
        (``LengthFree.fit_mass``, fitted on first use and kept by ``save``); ``"mask"`` sinks and band
        fitted from the mask itself (``LengthFree.fit``: fewer entries past the calibration, lower
        quality; RESULTS.md, "Masks past their calibrated length").

    Returns a ``PruneMask`` whose site ``s`` keeps bool [H, q_len, k_len] (token level) or
    [H, ceil(q_len/b), ceil(k_len/b)] (block level), with target and achieved sparsity recorded.
    """
    from .lengthfree import stats_form
    from .mask import PruneMask, SiteMask

    s = check_sparsity(sparsity)
    if length_free not in LENGTH_FREE:
        raise InvalidArgumentError(f"length_free must be one of {', '.join(map(repr, LENGTH_FREE))}, "
                                   f"got {length_free!r}")
    fn = POLICIES.get(policy)
    b = resolve_block(stats.granularity, block)
    units = [site_units(stats, site, b) for site in stats.sites]
    gen = torch.Generator().manual_seed(int(seed))
    keeps = fn(units, s, gen)

    site_masks, site_meta = [], {}
    for u, keep in zip(units, keeps):
        info = stats.infos[u.site]
        q_len, k_len = stats.q_len(u.site), stats.k_len(u.site)
        total = _total(u.weight)
        kept = _total(u.weight[keep])
        pruned = u.score[u.attendable & ~keep]
        site_meta[u.site] = {
            "q_len": q_len, "k_len": k_len, "target_sparsity": s,
            "sparsity": 1.0 - kept / total if total else 0.0,
            "paper_sparsity": 1.0 - kept / (info.num_heads * q_len * k_len) if q_len * k_len else 0.0,
            "kept_entries": int(kept), "attendable_entries": int(total),
            "kept_units": int(keep.sum()), "units": int(keep.numel()),
            # every unit scoring above this was kept (layer / head / global); None if nothing was pruned
            "threshold": float(pruned.max()) if pruned.numel() else None,
        }
        site_masks.append(SiteMask(info, q_len, k_len, keep=keep.contiguous(), block=b))
    total = sum(m["attendable_entries"] for m in site_meta.values())
    kept = sum(m["kept_entries"] for m in site_meta.values())
    meta = {
        "model": {"name": getattr(stats, "model_name", "") or "", "num_sites": len(site_masks),
                  "sites": [stats.infos[name].to_dict() for name in stats.sites]},
        "policy": policy, "seed": int(seed), "block": b, "stats_granularity": stats.granularity,
        "target_sparsity": s, "sparsity": 1.0 - kept / total if total else 0.0,
        "data": {"description": getattr(stats, "description", "") or "",
                 "num_sequences": int(getattr(stats, "num_sequences", 0) or 0)},
        "sites": site_meta,
    }
    if length_free == "stats":
        site_masks = [sm if sm.info.kind == "cross" else sm._with_form(stats_form(sm, stats)) for sm in site_masks]
        meta["length_free"] = {"rule": "mass", "mass": "kept"}
    return PruneMask(site_masks, meta)


from . import policy_elastic  # noqa: E402,F401  (registers "elastic", "elastic-site", "elastic-floor")
