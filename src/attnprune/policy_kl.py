"""The ``kl`` policy: keep the units that best preserve every query row's attention distribution.

Pruning a row of attention and renormalising it over the kept keys replaces the row's distribution
``p`` by ``q = p restricted to the kept keys / m``, where ``m`` is the row's kept mass; the divergence
of the new distribution from the old one is exactly

    KL(q || p) = sum_kept q log(q / p) = -log m.

``layer`` (the paper's rule) maximises the kept mass summed over all rows, ``sum m``: the first-order
form of that divergence, good while every row keeps nearly all of its mass. At 80-95% sparsity it
is not: a threshold pooled over a site spends the budget on the rows and heads with concentrated
attention (sinks, the diagonal) and leaves rows whose attention is spread with little mass. ``kl``
maximises ``sum over rows of -KL = sum log m`` instead, a concave objective that penalises starved
rows without bound, so every row keeps a share of its mass and spread rows get more units.

At block granularity a block row ``r`` of head ``h`` stands for its token rows: its mass ``T_r`` (the
units' scores summed over the row: the number of observed token rows, for probability scores) and
its kept mass ``K_r``; the objective is ``sum_r T_r log(K_r / T_r)``. Per row the best units for a
given count are those of highest score per attendable entry, so each row's units are taken in that
order; the ``j``-th one adds ``T_r log(1 + a_j / K_{j-1})`` for ``w_j`` entries. These gains per entry
fall along the row (made non-increasing by a running minimum where the entry counts differ), so
choosing units across rows, heads and sites in descending gain per entry until the budget is spent
is the greedy solution of the whole allocation (optimal up to the last unit when all units of a
row weigh the same). The first unit of every row has infinite gain: the row guarantee.

* ``kl``: each site keeps its own budget (as ``layer``), shared among its heads and rows;
* ``kl-global``: one allocation for the whole model: sites and heads whose rows are spread take
  more than their share (as ``global`` does for thresholds).

Scores are clipped at 0 (signed loss scores count only their positive part); rows with no mass
keep only their guaranteed unit. Cross-attention sites are treated as any other: no structure is
assumed, so the policy applies to every kind of site.
"""

from __future__ import annotations

import math

import torch

from .policies import POLICIES, _total, budget, select
from .units import Units


def kl_keys(u: Units) -> torch.Tensor:
    """float64 ``[H, R, C]``: each unit's gain in ``sum_r T_r log(K_r)`` per attendable entry, taken
    in the row's best-first order (non-increasing along that order; ``inf`` for a row's first unit,
    ``-inf`` where nothing is attendable)."""
    att = u.attendable
    w = u.weight.to(torch.float64)
    mass = torch.nan_to_num(u.score.to(torch.float64), nan=0.0).clamp_min(0.0).masked_fill(~att, 0.0)
    density = torch.where(att, mass / w.clamp_min(1e-300), torch.tensor(-math.inf, dtype=torch.float64))
    order = torch.argsort(density, dim=-1, descending=True, stable=True)  # lower key first on ties
    m = mass.gather(-1, order)
    ws = w.gather(-1, order)
    before = m.cumsum(-1) - m  # kept mass of the row before this unit
    total = mass.sum(-1, keepdim=True)
    gain = total * torch.log1p(m / before.clamp_min(1e-300))
    gain = torch.where(before > 0, gain, torch.where(m > 0, math.inf, 0.0))
    per = torch.where(ws > 0, gain / ws.clamp_min(1e-300), torch.tensor(-math.inf, dtype=torch.float64))
    per[..., 0] = torch.where(ws[..., 0] > 0, math.inf, -math.inf)  # the row's first unit: always worth it
    per = per.cummin(-1).values  # a row's units stay in their best-first order
    return torch.empty_like(per).scatter_(-1, order, per)


def _kl(units: list[Units], sparsity: float) -> list[torch.Tensor]:
    """One greedy allocation over ``units`` on their joint budget at ``sparsity``."""
    if not units:
        return []
    key = torch.cat([kl_keys(u).flatten() for u in units])
    weight = torch.cat([u.weight.flatten() for u in units])
    forced = key == math.inf  # each row's first unit (the row guarantee, in this policy's order)
    keep = select(key, weight, forced, budget(_total(weight), sparsity))
    return [part.view(u.score.shape) for part, u in zip(keep.split([u.score.numel() for u in units]), units)]


@POLICIES.register("kl")
def kl_policy(units: list[Units], sparsity: float, gen: torch.Generator) -> list[torch.Tensor]:
    """Per site, the units that maximise the sum over rows of log kept mass (see the module docs)."""
    return [_kl([u], sparsity)[0] for u in units]


@POLICIES.register("kl-global")
def kl_global_policy(units: list[Units], sparsity: float, gen: torch.Generator) -> list[torch.Tensor]:
    """``kl`` with one allocation over the whole model's budget (see the module docs)."""
    return _kl(units, sparsity)
