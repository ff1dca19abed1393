"""The ``kl`` policy: maximise the sum over query rows of log kept mass."""

import itertools
import math

import pytest
import torch

from attnprune.policies import make_mask, site_units
from attnprune.policy_kl import kl_keys
from test_policy_elastic import _rows, _stats


def _objective(keep: torch.Tensor, score: torch.Tensor) -> float:
    """sum over rows (heads x rows) of T_r log(K_r / T_r), -inf if a row with mass keeps none."""
    s = torch.nan_to_num(score.double(), nan=0.0).clamp_min(0.0)
    total = s.sum(-1)
    kept = (s * keep).sum(-1)
    live = total > 0
    if bool((kept[live] <= 0).any()):
        return -math.inf
    return float((total[live] * torch.log(kept[live] / total[live])).sum())


@pytest.mark.parametrize("kind,seed", [("self", 0), ("causal", 1), ("self", 2)])
def test_kl_is_the_best_subset_of_its_size_by_brute_force(kind, seed):
    """Token units (equal weights): for every budget the kept set has the largest sum of row log-masses
    of all subsets of that size (every subset enumerated)."""
    g = torch.Generator().manual_seed(seed)
    L = 4
    logits = torch.randn(1, L, L, generator=g, dtype=torch.float64) * 2.0
    if kind == "causal":
        logits = logits.masked_fill(torch.ones(L, L).triu(1).bool(), -math.inf)
    st = _stats({"s": (kind, logits.softmax(-1))})
    u = site_units(st, "s", None)
    att = u.attendable.flatten().nonzero().squeeze(1)
    n_att = att.numel()
    for sparsity in (0.3, 0.5, 0.6):
        keep = make_mask(st, sparsity, policy="kl", length_free="mask").site("s").keep
        n = int(keep.sum())
        assert n == n_att - math.floor(sparsity * n_att + 1e-9)
        got = _objective(keep, u.score)
        best = -math.inf
        for combo in itertools.combinations(att.tolist(), n):
            k = torch.zeros(u.score.numel(), dtype=torch.bool)
            k[list(combo)] = True
            best = max(best, _objective(k.view(u.score.shape), u.score))
        assert got >= best - 1e-9 * abs(best), (sparsity, got, best)


def test_kl_keys_fall_along_each_rows_best_first_order():
    """Within a row, a unit of higher score per entry never has a lower key; a row's first unit is inf."""
    g = torch.Generator().manual_seed(5)
    st = _stats({"s": ("causal", torch.rand(3, 40, 40, generator=g, dtype=torch.float64))}, granularity=4)
    u = site_units(st, "s", 8)
    key = kl_keys(u)
    dens = torch.nan_to_num(u.score / u.weight, nan=-1.0).masked_fill(~u.attendable, -1.0)
    for h, r in itertools.product(range(key.shape[0]), range(key.shape[1])):
        order = torch.argsort(dens[h, r], descending=True, stable=True)
        live = order[u.attendable[h, r, order]]
        ks = key[h, r, live]
        assert ks[0] == math.inf
        assert bool((ks[1:] <= ks[:-1]).all()), ks
        assert bool((key[h, r, ~u.attendable[h, r]] == -math.inf).all())


def test_kl_keeps_every_row_more_of_its_mass_than_layer():
    """A site with a sink-heavy, a local and a spread head: at equal budget ``layer`` starves some rows
    (its smallest kept row mass is lower) while ``kl`` raises the worst row and the sum of log masses;
    both meet the target sparsity."""
    L = 64
    p = _rows(L, "causal", [-2.0, 1.5, 0.02])
    st = _stats({"a": ("causal", p)})
    for sparsity in (0.7, 0.85):
        masks = {pol: make_mask(st, sparsity, policy=pol, length_free="mask") for pol in ("kl", "layer")}
        rows = {}
        for pol, m in masks.items():
            assert abs(m.sparsity - sparsity) < 1e-3
            keep = m.site("a").keep
            rows[pol] = (p * keep).sum(-1)  # [H, L] kept mass per row
        assert float(rows["kl"].min()) > 1.1 * float(rows["layer"].min()), sparsity
        assert float(torch.log(rows["kl"]).sum()) > float(torch.log(rows["layer"]).sum())


def test_kl_global_moves_budget_to_the_spread_site_and_kl_keeps_each_sites_own():
    """Blocks: ``kl`` meets the target in each site; ``kl-global`` gives the site of spread heads more
    entries than the site of local heads, within the model's budget."""
    L = 96
    st = _stats({"local": ("causal", _rows(L, "causal", [3.0, 2.0])),
                 "spread": ("causal", _rows(L, "causal", [0.01, 0.03]))}, granularity=8)
    per_site = make_mask(st, 0.6, policy="kl", length_free="mask")
    model = make_mask(st, 0.6, policy="kl-global", length_free="mask")
    for n in ("local", "spread"):
        assert 0.6 - 0.05 < per_site.meta["sites"][n]["sparsity"] <= 0.6 + 1e-9
    assert model.sparsity <= 0.6 + 1e-9
    sp = {n: model.meta["sites"][n]["sparsity"] for n in ("local", "spread")}
    assert sp["spread"] < sp["local"] - 0.1, sp
    for m in (per_site, model):  # every block row keeps an attendable block
        for n in ("local", "spread"):
            keep = m.site(n).keep
            u = site_units(st, n, 8)
            assert bool((keep & u.attendable).any(-1).all())
            assert not bool((keep & ~u.attendable).any())


def test_kl_on_cross_and_bidirectional_sites_and_degenerate_rows():
    """Cross and bidirectional sites, a head with no mass at all and NaN (unobserved) entries: the mask
    keeps only attendable units, one per row at least, and the budget; scores below 0 count as 0."""
    g = torch.Generator().manual_seed(2)
    p = torch.rand(3, 20, 20, generator=g, dtype=torch.float64)
    p[1] = 0.0  # a head with no mass: only its guaranteed units
    st = _stats({"x": ("cross", p), "e": ("self", _rows(20, "self", [1.0, 0.05]))})
    m = make_mask(st, 0.7, policy="kl")
    for n in ("x", "e"):
        keep = m.site(n).keep
        assert bool(keep.any(-1).all())
        assert abs(m.meta["sites"][n]["sparsity"] - 0.7) < 0.01
    assert bool(m.site("x").keep[1].sum(-1).eq(1).all())  # the massless head: one unit per row
