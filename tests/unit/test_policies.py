"""Mask policies on stats with known means (hand-checkable cases)."""

import math

import pytest
import torch

from attnprune.errors import InvalidArgumentError
from attnprune.policies import geometric_weight, make_mask
from attnprune.sites import SiteInfo
from attnprune.stats import AttentionStats

NAN = float("nan")


def stats_of(means: dict, kinds: dict | None = None, granularity: int = 1) -> AttentionStats:
    """AttentionStats whose mean(site) is exactly ``means[site]`` ([H, Q, K], NaN = never observed)."""
    kinds = kinds or {}
    infos = [SiteInfo(n, kinds.get(n, "self"), m.shape[0], m.shape[0]) for n, m in means.items()]
    st = AttentionStats(infos, granularity=granularity, model_name="test", description="hand-made")
    for n, m in means.items():
        m = torch.as_tensor(m, dtype=torch.float64)
        seen = ~torch.isnan(m[0])
        st.add(n, torch.nan_to_num(m) * seen, seen.double())
    return st


def one(means, sparsity, **kw):
    kind = kw.pop("kind", "self")
    st = stats_of({"s": torch.as_tensor(means, dtype=torch.float64)}, {"s": kind})
    m = make_mask(st, sparsity, **kw)
    return m, m["s"]


def causal_means(L, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(2, L, L, generator=g, dtype=torch.float64)
    return torch.where(torch.ones(L, L).tril().bool(), m, torch.tensor(NAN, dtype=torch.float64))


# ---- layer (paper) ---------------------------------------------------------------------------

def test_layer_keeps_top_entries_pooled_over_heads():
    means = [[[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]]]
    m, keep = one(means, 0.5)
    assert keep.tolist() == [[[True, True, False, False], [False, False, True, True]]]
    assert m.meta["sites"]["s"]["sparsity"] == pytest.approx(0.5)
    _, keep = one(means, 0.75)
    assert keep.tolist() == [[[True, False, False, False], [False, False, False, True]]]


def test_row_guarantee_overrides_budget():
    # 0.875 of 8 entries would keep 1, but each of the 2 rows keeps its best key.
    m, keep = one([[[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]]], 0.875)
    assert keep.tolist() == [[[True, False, False, False], [False, False, False, True]]]
    assert m.meta["sites"]["s"]["sparsity"] == pytest.approx(0.75)
    assert m.meta["sites"]["s"]["target_sparsity"] == pytest.approx(0.875)


def test_every_row_keeps_at_least_one_even_when_weak():
    g = torch.Generator().manual_seed(1)
    means = torch.rand(3, 16, 16, generator=g, dtype=torch.float64)
    means[1, 5] *= 1e-6  # a row much weaker than everything else
    for policy in ("layer", "head", "global", "random"):
        _, keep = one(means, 0.99, policy=policy)
        assert keep.any(-1).all(), policy


def test_exact_count_and_threshold():
    g = torch.Generator().manual_seed(2)
    means = torch.rand(2, 6, 6, generator=g, dtype=torch.float64)
    m, keep = one(means, 0.5)
    assert int(keep.sum()) == 36  # 72 attendable entries, half pruned
    # Threshold: apart from each row's forced best key, every kept entry beats every pruned one.
    forced = torch.zeros_like(keep)
    forced.scatter_(-1, means.argmax(-1, keepdim=True), True)
    assert means[keep & ~forced].min() > means[~keep].max()
    thr = m.meta["sites"]["s"]["threshold"]  # the best pruned mean (stats hold float32 means)
    assert thr == pytest.approx(float(means[~keep].max()))
    assert keep[means.float() > thr].all()


def test_ties_are_broken_by_position():
    means = [[[0.25] * 4, [0.25] * 4]]
    _, keep = one(means, 0.5)
    # rows' first keys are forced, then the lowest flat indices: (0, 1), (0, 2)
    assert keep.tolist() == [[[True, True, True, False], [True, False, False, False]]]
    _, again = one(means, 0.5)
    assert torch.equal(keep, again)


def test_zero_sparsity_keeps_every_attendable_entry():
    means = causal_means(7)
    m, keep = one(means, 0.0, kind="causal")
    assert torch.equal(keep, ~means.isnan())
    assert m.meta["sites"]["s"]["sparsity"] == 0.0


# ---- causal / unobserved entries --------------------------------------------------------------

def test_causal_future_is_not_counted():
    means = torch.full((1, 4, 4), NAN, dtype=torch.float64)
    rows = [[1.0], [0.6, 0.4], [0.5, 0.3, 0.2], [0.4, 0.35, 0.15, 0.1]]
    for i, r in enumerate(rows):
        means[0, i, : len(r)] = torch.tensor(r)
    m, keep = one(means, 0.5, kind="causal")
    # 10 attendable entries, keep 5: the 4 row bests (column 0) and then (1, 1) = 0.4
    want = torch.zeros(1, 4, 4, dtype=torch.bool)
    want[0, :, 0] = True
    want[0, 1, 1] = True
    assert torch.equal(keep, want)
    s = m.meta["sites"]["s"]
    assert s["sparsity"] == pytest.approx(0.5)
    assert s["attendable_entries"] == 10 and s["kept_entries"] == 5
    assert s["paper_sparsity"] == pytest.approx(1 - 5 / 16)


def test_never_observed_entries_are_never_kept():
    means = torch.rand(2, 5, 5, dtype=torch.float64)
    means[:, 3:, 2:] = NAN
    for policy in ("layer", "head", "global", "random"):
        m, keep = one(means, 0.3, policy=policy)
        assert not keep[:, 3:, 2:].any()
        assert m.meta["sites"]["s"]["attendable_entries"] == 2 * (25 - 6)


# ---- head / global / random -------------------------------------------------------------------

def test_head_policy_prunes_each_head_equally():
    strong = [[0.9, 0.8, 0.7, 0.6]] * 2
    weak = [[0.4, 0.3, 0.2, 0.1]] * 2
    _, layer = one([strong, weak], 0.5, policy="layer")
    _, head = one([strong, weak], 0.5, policy="head")
    # layer: 8 kept = rows' bests (col 0 of both heads) + strong head's columns 1 and 2
    assert layer[0].sum() == 6 and layer[1].sum() == 2
    assert layer[0, :, :3].all() and layer[1, :, 0].all()
    # head: 4 of 8 per head, columns 0 and 1
    assert head[:, :, :2].all() and not head[:, :, 2:].any()


def test_global_policy_pools_sites():
    g = torch.Generator().manual_seed(3)
    big = 0.5 + 0.5 * torch.rand(2, 4, 4, generator=g, dtype=torch.float64)
    small = 0.1 * torch.rand(2, 4, 4, generator=g, dtype=torch.float64)
    st = stats_of({"big": big, "small": small})
    glob = make_mask(st, 0.5, policy="global")
    lay = make_mask(st, 0.5, policy="layer")
    assert int(glob["big"].sum() + glob["small"].sum()) == 32  # half of 64 over the model
    assert int(glob["small"].sum()) == 8  # only the rows' forced bests survive
    assert int(glob["big"].sum()) == 24
    assert int(lay["big"].sum()) == 16 and int(lay["small"].sum()) == 16
    assert glob.meta["sparsity"] == pytest.approx(0.5)


def test_random_keeps_same_count_as_layer_but_elsewhere():
    g = torch.Generator().manual_seed(4)
    st = stats_of({"a": causal_means(12, 5), "b": torch.rand(2, 12, 9, generator=g, dtype=torch.float64)},
                  {"a": "causal"})
    lay = make_mask(st, 0.8, policy="layer")
    r0 = make_mask(st, 0.8, policy="random", seed=0)
    r0b = make_mask(st, 0.8, policy="random", seed=0)
    r1 = make_mask(st, 0.8, policy="random", seed=1)
    for site in ("a", "b"):
        assert int(r0[site].sum()) == int(lay[site].sum())
        assert not torch.equal(r0[site], lay[site])
        assert torch.equal(r0[site], r0b[site])
        assert r0[site].any(-1).all()
    assert not torch.equal(r0["b"], r1["b"])
    assert not (r0["a"] & st.mean("a").isnan()).any()  # nothing in the causal future


# ---- blocks ----------------------------------------------------------------------------------

def _blocky(values, b):
    """Token means [1, 2b, 2b] constant on b x b blocks with the given [2, 2] values."""
    return torch.tensor(values, dtype=torch.float64).repeat_interleave(b, 0).repeat_interleave(b, 1)[None]


def test_block_selection_by_mass():
    means = _blocky([[0.4, 0.1], [0.05, 0.45]], 2)
    m, keep = one(means, 0.5, block=2)
    assert m.site("s").keep_blocks.tolist() == [[[True, False], [False, True]]]
    assert m.meta["sites"]["s"]["sparsity"] == pytest.approx(0.5)
    assert torch.equal(keep, _blocky([[1, 0], [0, 1]], 2).bool())
    m, _ = one(means, 0.25, block=2)
    assert m.site("s").keep_blocks.tolist() == [[[True, True], [False, True]]]


def test_block_sparsity_counts_attendable_entries_in_kept_blocks():
    means = torch.full((1, 4, 4), NAN, dtype=torch.float64)
    tri = torch.ones(4, 4).tril().bool()
    means[0][tri] = 0.1
    means[0, 2:, :2] = 0.3  # block (1, 0) has more mass than the diagonal block (1, 1)
    m, _ = one(means, 0.5, kind="causal", block=2)
    # blocks (0,0): 3 entries, (1,0): 4, (1,1): 3. Row guarantee keeps (0,0) and (1,0): 7 of 10.
    assert m.site("s").keep_blocks.tolist() == [[[True, False], [True, False]]]
    s = m.meta["sites"]["s"]
    assert (s["kept_entries"], s["attendable_entries"]) == (7, 10)
    assert s["sparsity"] == pytest.approx(0.3)
    assert s["paper_sparsity"] == pytest.approx(1 - 7 / 16)


def test_block_stats_give_same_mask_as_token_stats():
    g = torch.Generator().manual_seed(6)
    tok = torch.rand(2, 8, 8, generator=g, dtype=torch.float64)
    coarse = tok.view(2, 4, 2, 4, 2).mean((2, 4))  # per-entry mean of each 2x2 block
    st_tok = stats_of({"s": tok})
    infos = [SiteInfo("s", "self", 2, 2)]
    st_blk = AttentionStats(infos, granularity=2)
    st_blk.add("s", coarse * 4, torch.full((4, 4), 4.0), q_len=8, k_len=8)
    for block in (2, 4):
        a = make_mask(st_tok, 0.6, block=block).site("s").keep_blocks
        b = make_mask(st_blk, 0.6, block=block).site("s").keep_blocks
        assert torch.equal(a, b), block
    assert make_mask(st_blk, 0.6).block == 2  # default block = granularity
    with pytest.raises(InvalidArgumentError, match="multiple"):
        make_mask(st_blk, 0.6, block=3)


@pytest.mark.parametrize("kind,q,k,g", [("causal", 4, 4, 2), ("causal", 5, 5, 2), ("self", 7, 5, 3),
                                        ("cross", 3, 10, 4), ("causal", 9, 9, 4)])
def test_geometric_weight_matches_brute_force(kind, q, k, g):
    tok = torch.ones(q, k)
    if kind == "causal":
        tok = tok.tril()
    qb, kb = math.ceil(q / g), math.ceil(k / g)
    want = torch.zeros(qb, kb, dtype=torch.float64)
    for i in range(q):
        for j in range(k):
            want[i // g, j // g] += tok[i, j]
    assert torch.equal(geometric_weight(kind, q, k, g), want)


# ---- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "lots", None])
def test_sparsity_out_of_range(bad):
    st = stats_of({"s": torch.rand(1, 3, 3, dtype=torch.float64)})
    with pytest.raises(InvalidArgumentError, match="sparsity"):
        make_mask(st, bad)


def test_unknown_policy_and_bad_block():
    st = stats_of({"s": torch.rand(1, 3, 3, dtype=torch.float64)})
    with pytest.raises(InvalidArgumentError, match="layer"):
        make_mask(st, 0.5, policy="nope")
    for bad in (0, -2, 1.5):
        with pytest.raises(InvalidArgumentError, match="block"):
            make_mask(st, 0.5, block=bad)


def test_causal_block_stats_weigh_blocks_by_their_entries():
    # granularity-2 stats of a causal 7x7 site must select the same blocks as its token stats
    for seed in range(5):
        tok = causal_means(7, seed)
        seen = ~tok[0].isnan()
        pad = lambda x: torch.nn.functional.pad(x, (0, 1, 0, 1))
        sums = pad(torch.nan_to_num(tok)).view(2, 4, 2, 4, 2).sum((2, 4))
        counts = pad(seen.double()).view(4, 2, 4, 2).sum((1, 3))
        st_blk = AttentionStats([SiteInfo("s", "causal", 2, 2)], granularity=2)
        st_blk.add("s", sums, counts, q_len=7, k_len=7)
        st_tok = stats_of({"s": tok}, {"s": "causal"})
        for s in (0.3, 0.6):
            a, b = make_mask(st_tok, s, block=2), make_mask(st_blk, s, block=2)
            assert torch.equal(a.site("s").keep_blocks, b.site("s").keep_blocks), (seed, s)
            assert a.meta["sites"]["s"]["kept_entries"] == b.meta["sites"]["s"]["kept_entries"]


def test_never_prunes_more_than_asked():
    # 10 entries at 0.77: floor(7.7) = 7 pruned, 3 kept (rounding would prune 8)
    m, keep = one([[[0.1 * i for i in range(10)]]], 0.77)
    assert int(keep.sum()) == 3 and keep[0, 0, 7:].all()
    assert m.meta["sites"]["s"]["sparsity"] == pytest.approx(0.7)


# ---- structured ----------------------------------------------------------------------------------

def _far_scores(L):
    """Causal means largest far from the diagonal (key near query / 2): ``layer`` keeps no band."""
    q, k = torch.arange(L)[:, None].double(), torch.arange(L)[None, :].double()
    m = (-(k - q / 2).abs()).exp().expand(2, L, L).clone()
    m[1] *= 0.5
    return torch.where(torch.ones(L, L).tril().bool(), m, torch.tensor(NAN, dtype=torch.float64))


def test_structured_keeps_sinks_and_a_band_and_fills_the_rest_by_score():
    from attnprune.policies import BAND_SHARE, SINK_TOKENS

    L, s = 128, 0.8
    means = _far_scores(L)
    m, keep = one(means, s, kind="causal", policy="structured")
    _, layer = one(means, s, kind="causal", policy="layer")
    att = ~torch.isnan(means)
    assert abs(m.sparsity - s) < 1e-3
    assert keep[:, :, :SINK_TOKENS][att[:, :, :SINK_TOKENS]].all()  # sink columns
    assert keep.diagonal(0, 1, 2).all() and keep.diagonal(-1, 1, 2).all()  # the band's first two diagonals
    assert not layer.diagonal(-2, 1, 2)[:, 32:].any()  # the paper's rule keeps no band here
    # sinks + band hold at most BAND_SHARE of the budget: the rest was chosen by score
    budget = att.sum() - math.floor(s * att.sum())
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    width = next(w for w in range(1, L) if not keep.diagonal(-w, 1, 2).all())  # diagonals 0..w-1 kept
    structure = (j < SINK_TOKENS) | ((i - j >= 0) & (i - j < width))
    assert (structure.expand(2, L, L) & att).sum() <= BAND_SHARE * budget + L  # + the row guarantee
    rest = att & ~structure
    assert means[keep & rest].min() >= means[~keep & rest].max()


def test_structured_at_block_level_and_for_bidirectional_sites():
    L = 256
    st = stats_of({"c": _far_scores(L)}, {"c": "causal"})
    m = make_mask(st, 0.75, policy="structured", block=16)
    kb = m.site("c").keep  # [2, 16, 16] blocks
    assert kb[:, :, 0].all() and kb.diagonal(0, 1, 2).all()
    assert 0.7 < m.sparsity <= 0.75  # whole blocks: at most the target, near it
    g = torch.Generator().manual_seed(0)
    st2 = stats_of({"s": torch.rand(2, 32, 32, generator=g, dtype=torch.float64)}, {"s": "self"})
    keep = make_mask(st2, 0.5, policy="structured")["s"]
    assert keep.diagonal(1, 1, 2).all() and keep.diagonal(-1, 1, 2).all()  # a symmetric band


# ---- streaming -----------------------------------------------------------------------------------

def test_streaming_keeps_sinks_then_nearest_diagonals_to_the_budget():
    from attnprune.policies import SINK_TOKENS

    L, s = 64, 0.85
    means = _far_scores(L)  # the scores would pull a score-based policy away from the diagonal
    m, keep = one(means, s, kind="causal", policy="streaming")
    att = ~torch.isnan(means)
    n_att = int(att.sum())
    assert int(keep.sum()) == n_att - math.floor(s * n_att)  # token units: exactly the budget
    assert not (keep & ~att).any()
    assert keep[:, :, :SINK_TOKENS][att[:, :, :SINK_TOKENS]].all()
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    dist = (i - j).expand(2, L, L)
    rest = att & (j >= SINK_TOKENS).expand(2, L, L)
    assert dist[keep & rest].max() <= dist[~keep & rest].min()  # nearer diagonals first, scores ignored


def test_streaming_at_block_level_and_bidirectional():
    L = 512  # 16 block rows: the sink column and the diagonal fit in 20% of the entries
    st = stats_of({"c": _far_scores(L)}, {"c": "causal"})
    m = make_mask(st, 0.8, policy="streaming", block=32)
    kb = m.site("c").keep  # [2, 16, 16]
    assert kb[:, :, 0].all() and kb.diagonal(0, 1, 2).all()
    assert not kb.triu(1).any()  # never a block above the diagonal (not attendable)
    assert m.sparsity <= 0.8
    g = torch.Generator().manual_seed(0)
    st2 = stats_of({"s": torch.rand(2, 32, 32, generator=g, dtype=torch.float64)}, {"s": "self"})
    keep = make_mask(st2, 0.7, policy="streaming")["s"]
    i, j = torch.arange(32)[:, None], torch.arange(32)[None, :]
    dist = (i - j).abs().expand(2, 32, 32)
    rest = (j >= 4).expand(2, 32, 32)
    assert dist[keep & rest].max() <= dist[~keep & rest].min()  # a symmetric band


def test_streaming_keeps_the_diagonal_even_past_the_budget():
    L = 256  # 8 block rows of 32: the sink column alone is over 20% of the entries
    st = stats_of({"c": _far_scores(L)}, {"c": "causal"})
    kb = make_mask(st, 0.8, policy="streaming", block=32).site("c").keep
    assert kb[:, :, 0].all() and kb.diagonal(0, 1, 2).all()


def test_structured_global_gives_the_rest_of_the_budget_to_the_higher_scoring_site():
    from attnprune.policies import POLICIES, site_units  # noqa: F401

    L, s = 96, 0.8
    hi, lo = _far_scores(L), _far_scores(L) * 0.01  # same shape of scores, one site 100x weaker
    st = stats_of({"a": hi, "b": lo}, {"a": "causal", "b": "causal"})
    per_site = make_mask(st, s, policy="structured")
    model_wide = make_mask(st, s, policy="structured-global")
    att = int((~torch.isnan(hi)).sum()) * 2
    kept = lambda m: {k: int(m[k].sum()) for k in ("a", "b")}  # noqa: E731
    ps, mw = kept(per_site), kept(model_wide)
    assert ps["a"] == ps["b"]  # per site: equal budgets
    assert mw["a"] > ps["a"] and mw["b"] < ps["b"]  # model-wide: the strong site takes the rest
    assert sum(mw.values()) == att - math.floor(s * att)  # one budget for the whole model
    for k in ("a", "b"):  # both keep structured's fixed part: sinks and the diagonal
        assert model_wide[k][:, :, 0].all() and model_wide[k].diagonal(0, 1, 2).all()
