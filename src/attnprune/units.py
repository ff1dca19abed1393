"""Selection units: a site's attention statistics cut into token entries or ``b x b`` blocks, each
with a score (attention mass) and a weight (attendable token entries), for the policies."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import EmptyDatasetError, InvalidArgumentError


@dataclass
class Units:
    """The selection units of one site.

    score: float [H, R, C], attention mass per unit, NaN where nothing is attendable.
    weight: float [H, R, C], attendable token entries per unit (0 where none).
    (float32 for token units, float64 for blocks; sums are taken in float64.)
    """

    site: str
    score: torch.Tensor
    weight: torch.Tensor
    unit: int = 1  # tokens per unit side (1: token units, b: b x b blocks)
    kind: str = "causal"  # the site's kind (self / causal / cross)

    @property
    def attendable(self) -> torch.Tensor:
        return self.weight > 0


def geometric_weight(kind: str, q_len: int, k_len: int, g: int) -> torch.Tensor:
    """float64 [ceil(q_len/g), ceil(k_len/g)]: token entries of each g x g block inside the lengths.

    Under ``kind == "causal"`` only entries with ``key <= query + (k_len - q_len)`` count.
    """
    qb, kb = -(-q_len // g), -(-k_len // g)
    col0 = torch.arange(kb, dtype=torch.float64) * g
    width = torch.clamp(k_len - col0, max=g)  # [Kb]
    if kind != "causal":
        height = torch.clamp(q_len - torch.arange(qb, dtype=torch.float64) * g, max=g)
        return height[:, None] * width[None, :]
    rows = torch.arange(q_len, dtype=torch.float64) + (k_len - q_len)  # last visible key per row
    per_row = torch.minimum(torch.clamp(rows[:, None] - col0[None, :] + 1, min=0), width[None, :])
    per_row = torch.nn.functional.pad(per_row, (0, 0, 0, qb * g - q_len))
    return per_row.view(qb, g, kb).sum(1)


def _pool(x: torch.Tensor, r: int) -> torch.Tensor:
    """Sum [H, R, C] over r x r groups -> [H, ceil(R/r), ceil(C/r)] (zero padding)."""
    if r == 1:
        return x
    h, rr, cc = x.shape
    x = torch.nn.functional.pad(x, (0, -cc % r, 0, -rr % r))
    return x.view(h, x.shape[1] // r, r, x.shape[2] // r, r).sum((2, 4))


def site_units(stats, site: str, block: int | None) -> Units:
    """Selection units of ``site``: tokens (``block`` None, token stats) or ``block x block`` blocks."""
    g = stats.granularity
    if hasattr(stats, "observed") and not stats.observed(site):
        raise EmptyDatasetError(f"site {site!r} was never observed; the stats hold no attention for it")
    mean = stats.mean(site)  # [H, Qg, Kg], NaN where never observed
    observed = ~torch.isnan(mean)
    kind = stats.infos[site].kind
    if g == 1 and block is None:  # token units: score = mean, weight 1 where observed
        return Units(site, mean, observed.to(mean.dtype), 1, kind)
    mean = mean.to(torch.float64)
    if g == 1:
        weight = observed.to(torch.float64)
    else:
        info = stats.infos[site]
        geo = geometric_weight(info.kind, stats.q_len(site), stats.k_len(site), g)
        geo = geo[: mean.shape[1], : mean.shape[2]]
        weight = torch.where(observed, geo.expand_as(mean), torch.zeros_like(mean))
    mass = torch.nan_to_num(mean, nan=0.0) * weight
    r = 1 if block is None else block // g
    mass, weight = _pool(mass, r), _pool(weight, r)
    score = torch.where(weight > 0, mass, torch.full_like(mass, math.nan))
    return Units(site, score, weight, block or g, kind)


def resolve_block(granularity: int, block: int | None) -> int | None:
    """The mask's block size: ``block``, or the stats' granularity when that is > 1."""
    if block is None:
        return granularity if granularity > 1 else None
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise InvalidArgumentError(f"block must be a positive integer, got {block!r}")
    if block % granularity:
        raise InvalidArgumentError(
            f"block={block} is not a multiple of the stats granularity {granularity}; "
            f"use a block size divisible by {granularity} or observe at a finer granularity")
    return block


