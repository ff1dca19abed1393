"""The ``elastic`` policy: per-head sink columns and a local band, sized by one model-wide allocation.

``streaming`` keeps the same structure for every head of a site (the sink columns and the nearest
diagonals until the site's budget is spent), whatever the data say; ``structured`` keeps a fixed
structure and spends the rest on scattered high-scoring units. ``elastic`` keeps only structure, as
MoA and DuoAttention do, but chooses it per head from the statistics:

* per head, a band of the ``k`` diagonals nearest the main one (``0 <= r - c < k``; ``|r - c| < k``
  for bidirectional sites) and ``s`` sink columns (``c < s``), with ``k >= 1`` (the diagonal: every
  row keeps a unit) and ``s`` from the sink minimum of ``structured`` (``SINK_TOKENS``, at least one
  unit column) up to ``MAX_EXTRA_SINKS`` more;
* the kept mass of ``(k, s)`` (the units' scores, clipped at 0: attention probability mass with the
  paper's score) and its cost (attendable token entries) from prefix sums over diagonals and columns;
* one Lagrange multiplier ``lam`` for the whole model: every head takes the ``(k, s)`` that maximises
  ``mass - lam * cost``, and ``lam`` is the smallest (bisection) whose total cost fits the model's
  budget (the minimum structure is kept even past it, as in ``streaming``); so a head whose attention is spread gets a wide band and a local head a narrow one, and
  sites differ as their heads do;
* the budget left by that discrete choice (at most one head's next step) goes to the highest-scoring
  remaining units of the model, as ``global`` would spend it.

``elastic-floor``: the same allocation above ``streaming``'s structure: every head first keeps the
whole diagonals (and the sink columns) that the uniform band of its site holds at this sparsity, and
the model-wide allocation spends only what is left (wider bands, more sink columns, then single units).
At 90% the free allocation narrows the heads the data call unimportant below the uniform band, and
that band (``streaming``) beat it at 8k tokens; the floor keeps the band and lets the data place the
remainder (SmolLM2 at 8k, 128-blocks, 90%, with ``score="value"``: x1.074 of dense perplexity against
``streaming``'s x1.115; at 80%, where the band is most of the budget, the free allocation is as good or
better; RESULTS.md).

Cross-attention sites have no diagonal: each gets ``layer``'s selection at the target sparsity on its
own budget and takes no part in the allocation.
"""

from __future__ import annotations

import math

import torch

from .policies import POLICIES, SINK_TOKENS, _layer_one, _total, budget, row_best, select
from .units import Units

MAX_EXTRA_SINKS = 16  # sink columns a head may take beyond the minimum (in units)
_BISECTIONS = 60


def _tables(u: Units, s0: int, S: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``[H, D, S]`` kept mass and cost of site ``u`` with a band of ``k = 1 .. D`` diagonals
    (index ``k - 1``) and ``s = s0 .. s0 + S - 1`` sink columns (index ``s - s0``)."""
    H, R, C = u.score.shape
    mass = torch.nan_to_num(u.score.to(torch.float64), nan=0.0).clamp_min(0.0)
    cost = u.weight.to(torch.float64)
    D = R
    d = torch.arange(D)[:, None]  # distance
    c = torch.arange(C)[None, :]  # column

    def by_distance(x: torch.Tensor) -> torch.Tensor:
        """``[H, D, C]``: x at (row c + d, column c), plus (row c - d, column c) for d > 0 on
        bidirectional sites; 0 outside the grid."""
        rows = c + d
        out = x[:, rows.clamp(max=R - 1), c.expand(D, C)] * (rows < R)
        if u.kind != "causal":
            up = c - d
            out = out + x[:, up.clamp(min=0), c.expand(D, C)] * ((up >= 0) & (d > 0))
        return out

    tables = []
    for x in (mass, cost):
        per = by_distance(x)  # [H, D, C]
        band = per.sum(-1).cumsum(-1)  # [H, D]: distances 0 .. k-1
        cols = x.sum(1)  # [H, C]: column totals
        inside = per.cumsum(1)  # [H, D, C]: column c's part within distances 0 .. k-1
        outside = cols[:, None, :] - inside  # column c's part outside the band of k diagonals
        sinks = outside.cumsum(-1)  # [H, D, C]: columns 0 .. s-1 outside the band
        s_idx = torch.arange(s0, s0 + S).clamp(max=C) - 1  # the last sink column (s0 >= 1)
        tables.append(band[:, :, None] + sinks[:, :, s_idx])
    return tables[0], tables[1]


def _structure(u: Units, k: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """bool ``[H, R, C]``: per head the band of ``k [H]`` diagonals and ``s [H]`` sink columns,
    attendable units only, with the row guarantee for rows the structure leaves without a unit (its
    own units are what the allocation paid for: a row's best unit outside them would be kept past the
    budget, as happened with signed ``loss`` scores, whose best unit is often far from the diagonal)."""
    H, R, C = u.score.shape
    r = torch.arange(R)[None, :, None]
    col = torch.arange(C)[None, None, :]
    dist = r - col if u.kind == "causal" else (r - col).abs()
    band = (dist >= 0) & (dist < k[:, None, None])
    kept = (band | (col < s[:, None, None])) & u.attendable
    return kept | (row_best(u) & ~kept.any(-1, keepdim=True))


@POLICIES.register("elastic")
def elastic_policy(units: list[Units], sparsity: float, gen: torch.Generator) -> list[torch.Tensor]:
    """Per-head sinks + band, sized by one model-wide allocation of kept mass (see the module docs)."""
    return _elastic(units, sparsity)


@POLICIES.register("elastic-floor")
def elastic_floor_policy(units: list[Units], sparsity: float, gen: torch.Generator) -> list[torch.Tensor]:
    """``elastic`` above ``streaming``'s whole diagonals: no head keeps a narrower band than its site's
    uniform band (see the module docs)."""
    return _elastic(units, sparsity, floor=True)


@POLICIES.register("elastic-site")
def elastic_site_policy(units: list[Units], sparsity: float, gen: torch.Generator) -> list[torch.Tensor]:
    """``elastic`` within each site: every site keeps its own budget (as ``streaming`` and ``layer``
    do), shared among its heads by the same allocation of kept mass."""
    return [_elastic([u], sparsity)[0] for u in units]


def _floor(m: torch.Tensor, c: torch.Tensor, u: Units, sparsity: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables without the options narrower than the whole diagonals ``K`` that the site's budget
    holds with every head at the same band and the fewest sink columns (at least the diagonal)."""
    per_k = c[:, :, 0].sum(0)  # [D]: the site's cost with every head at k = 1 .. D diagonals
    K = max(1, int((per_k <= budget(_total(u.weight), sparsity)).sum()))  # per_k grows with k
    m, c = m.clone(), c.clone()
    m[:, :K - 1], c[:, :K - 1] = -math.inf, math.inf
    return m, c


def _elastic(units: list[Units], sparsity: float, floor: bool = False) -> list[torch.Tensor]:
    """Allocation over ``units`` on their joint budget at ``sparsity``; ``floor``: no head below its
    site's uniform band (``elastic-floor``)."""
    out: list[torch.Tensor | None] = [None] * len(units)
    own = [i for i, u in enumerate(units) if u.kind != "cross"]
    for i, u in enumerate(units):
        if u.kind == "cross":
            out[i] = _layer_one(u, sparsity)
    if not own:
        return out  # type: ignore[return-value]
    mass, cost, lo_s = [], [], []
    for i in own:
        u = units[i]
        C = u.score.shape[2]
        s0 = min(C, max(1, math.ceil(SINK_TOKENS / u.unit)))
        S = min(C, s0 + MAX_EXTRA_SINKS) - s0 + 1
        m, c = _tables(u, s0, S)
        if floor:
            m, c = _floor(m, c, u, sparsity)
        pad = (0, MAX_EXTRA_SINKS + 1 - S, 0, 0)  # one shape for every site: never-chosen options
        mass.append(torch.nn.functional.pad(m, pad, value=-math.inf))
        cost.append(torch.nn.functional.pad(c, pad, value=math.inf))
        lo_s.append(s0)
    D = max(m.shape[1] for m in mass)
    grow = lambda t, v: torch.nn.functional.pad(t, (0, 0, 0, D - t.shape[1]), value=v)
    heads = [m.shape[0] for m in mass]
    M = torch.cat([grow(m, -math.inf) for m in mass]).flatten(1)  # [Htot, D * S]
    Cst = torch.cat([grow(c, math.inf) for c in cost]).flatten(1)
    total = budget(sum(_total(units[i].weight) for i in own), sparsity)

    def pick(lam: float) -> torch.Tensor:
        return (M - lam * torch.nan_to_num(Cst, posinf=1e300)).argmax(1)  # first maximum on ties

    def spent(choice: torch.Tensor) -> float:
        return float(Cst.gather(1, choice[:, None]).sum())

    ratio = M / Cst  # mass per entry of each option (NaN / -inf where none)
    ratio = ratio[torch.isfinite(ratio)]
    lo, hi = 0.0, 2.0 * float(ratio.max()) + 1.0 if ratio.numel() else 1.0  # at hi every head takes its cheapest
    if spent(pick(lo)) <= total:
        hi = lo
    for _ in range(_BISECTIONS if hi > lo else 0):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if spent(pick(mid)) <= total else (mid, hi)
    choice = pick(hi)
    S1 = MAX_EXTRA_SINKS + 1
    forced = []
    for j, part in enumerate(choice.split(heads)):
        u = units[own[j]]
        forced.append(_structure(u, part // S1 + 1, lo_s[j] + part % S1))
    key = torch.cat([units[i].score.flatten().to(torch.float64) for i in own])
    weight = torch.cat([units[i].weight.flatten() for i in own])
    keep = select(key, weight, torch.cat([f.flatten() for f in forced]), total)
    for i, part in zip(own, keep.split([units[i].score.numel() for i in own])):
        out[i] = part.view(units[i].score.shape)
    return out  # type: ignore[return-value]
