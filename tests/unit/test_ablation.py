"""The ``ablation`` score: measured per-head band losses, their block scores, and the policies using them."""

import math

import pytest
import torch
import torch.nn.functional as F

import tiny_models as tm
from attnprune.ablation import band_mask, band_scores, default_widths, measure_bands, profile_bands
from attnprune.apply import apply
from attnprune.capture import intercept
from attnprune.errors import EmptyDatasetError, InvalidArgumentError
from attnprune.mask import PruneMask, SiteMask
from attnprune.observe import observe
from attnprune.policies import POLICIES
from attnprune.units import Units, site_units

EPS64 = torch.finfo(torch.float64).eps


def _band_brute(lq, lk, g, width, sinks, causal):
    keep = torch.zeros(lq, lk, dtype=torch.bool)
    for i in range(lq):
        pos = i + lk - lq
        for j in range(lk):
            d = pos // g - j // g
            inside = (0 <= d < width) if causal else abs(d) < width
            keep[i, j] = (inside or j // g < sinks) and (not causal or j <= pos)
    return keep


@pytest.mark.parametrize("lq,lk,g,width,sinks,causal", [(13, 13, 4, 2, 1, True), (7, 13, 3, 1, 2, True),
                                                        (10, 10, 4, 2, 1, False), (9, 9, 2, 3, 1, False)])
def test_band_mask_matches_its_definition(lq, lk, g, width, sinks, causal):
    assert torch.equal(band_mask(lq, lk, g, width, sinks, causal), _band_brute(lq, lk, g, width, sinks, causal))


def _nll_sum(model, ids):
    logits = model(input_ids=ids).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")


def _infos(model, ids):
    infos = {}
    with torch.no_grad(), intercept(model, lambda c: infos.setdefault(c.site, c.info) and None):
        model(input_ids=ids)
    return infos


def _one_head_mask(infos, L, site, head, keep, others):
    sms = []
    for name, info in infos.items():
        k = others.expand(info.num_heads, L, L).clone()
        if name == site:
            k[head] = keep
        sms.append(SiteMask(info, L, L, keep=k))
    return PruneMask(sms, {"model": {"name": "tiny"}})


@pytest.mark.parametrize("base", [None, 1])
def test_profile_measures_each_heads_loss_increase(base):
    """Every (site, head, width) of the profile equals the NLL change of the model with that one head masked
    by the band (through ``apply``'s reference backend, float64), the other heads dense (``base`` None) or
    restricted to the baseline band, whatever the batching of the configurations."""
    torch.manual_seed(0)
    model = tm.llama(seed=3).double()
    L, g = 14, 4
    ids = [torch.randint(3, tm.VOCAB, (2, L)), torch.randint(3, tm.VOCAB, (1, L))]
    batches = [{"input_ids": x} for x in ids]
    prof = profile_bands(model, batches, granularity=g, base=base, configs_per_forward=3, progress=False)
    other = profile_bands(model, batches, granularity=g, base=base, configs_per_forward=1, progress=False)
    others = torch.ones(L, L, dtype=torch.bool).tril() if base is None else _band_brute(L, L, g, base, 1, True)
    infos = _infos(model, ids[0])
    assert prof.base == base and other.base == base
    assert list(prof.delta) == list(infos) and prof.widths[next(iter(infos))] == [1, 2, 3]
    assert prof.tokens == 3 * (L - 1) and prof.sequences == 3
    with torch.no_grad():
        if base is None:
            dense = sum(float(_nll_sum(model, x)) for x in ids)
        else:
            with apply(model, _one_head_mask(infos, L, next(iter(infos)), 0, others, others), backend="reference"):
                dense = sum(float(_nll_sum(model, x)) for x in ids)
        for site in infos:
            assert prof.delta[site].shape == (4, 3)
            for head in range(4):
                for i, w in enumerate(prof.widths[site]):
                    mask = _one_head_mask(infos, L, site, head, _band_brute(L, L, g, w, 1, True), others)
                    with apply(model, mask, backend="reference"):
                        masked = sum(float(_nll_sum(model, x)) for x in ids)
                    want = (masked - dense) / prof.tokens
                    tol = 1e3 * EPS64 * max(1.0, dense / prof.tokens)
                    assert abs(float(prof.delta[site][head, i]) - want) <= tol, (site, head, w)
                    assert abs(float(other.delta[site][head, i]) - want) <= tol
    # the measurement is not all zeros; around the baseline band its own width changes nothing
    assert max(float(d.abs().max()) for d in prof.delta.values()) > 1e-6
    if base is not None:
        assert all(float(d[:, prof.widths[s].index(base)].abs().max()) <= tol for s, d in prof.delta.items())


def _units_of(stats, block=None):
    return [site_units(stats, s, block) for s in stats.sites]


def test_band_scores_give_each_band_its_measured_loss():
    """The score mass a band of k diagonals (plus the sink columns) keeps is a constant minus the measured
    loss, made non-increasing in k and clipped at 0; between widths it is interpolated linearly."""
    delta = torch.tensor([[0.5, 0.2, 0.25, 0.05], [0.1, -0.02, 0.0, 0.0]], dtype=torch.float64)
    widths = [1, 2, 3, 5]
    L, g, sinks = 40, 4, 1  # 10 block rows
    sums, count = band_scores(delta, widths, "causal", L, L, g, sinks)
    R = count.shape[0]
    r, c = torch.arange(R)[:, None], torch.arange(R)[None, :]
    assert torch.equal(count, tm_geometric(L, g))
    want = {0: [0.5, 0.25, 0.25, 0.05], 1: [0.1, 0.0, 0.0, 0.0]}  # running max from the right, clipped

    def kept(h, k):
        return float(sums[h][((r - c >= 0) & (r - c < k)) | (c < sinks)].sum())

    full = [kept(h, R) for h in range(2)]
    for h in range(2):
        for w, d in zip(widths, want[h]):
            assert math.isclose(full[h] - kept(h, w), d, rel_tol=1e-12, abs_tol=1e-15)
        assert math.isclose(full[h] - kept(h, 4), (want[h][2] + want[h][3]) / 2, rel_tol=1e-12, abs_tol=1e-15)
    # the diagonal and sink blocks carry the head's highest score per entry
    dens = sums / count.clamp_min(1)
    assert torch.all(dens[0][(r == c) | (c < sinks)].ge(dens[0][(r > c) & (c >= sinks)].max()))


def tm_geometric(L, g):
    from attnprune.units import geometric_weight
    return geometric_weight("causal", L, L, g)


def test_elastic_gives_the_width_to_the_head_that_measured_a_loss():
    """With ablation scores ``elastic`` widens the band of the head whose loss grows when banded and keeps
    the insensitive head at the diagonal: the allocation MoA solves."""
    L, g = 64, 8
    delta = torch.tensor([[0.9, 0.6, 0.4, 0.3, 0.1, 0.05], [0.001, 0.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    sums, count = band_scores(delta, [1, 2, 3, 4, 5, 6], "causal", L, L, g, 1)
    u = Units("s", torch.where(count > 0, sums, torch.full_like(sums, float("nan"))),
              count.expand(2, -1, -1).clone(), g, "causal")
    keep = POLICIES.get("elastic")([u], 0.4, torch.Generator())[0]
    r, c = torch.arange(8)[:, None], torch.arange(8)[None, :]
    # 40% of the 2 x 2080 attendable entries pruned leaves 2496: the insensitive head gets its minimum (diagonal
    # and sink column, 736 entries, at most one leftover block), the other everything else (at least 3 diagonals)
    assert bool(keep[0][(r - c >= 0) & (r - c < 3)].all())
    minimum = (r == c) | (c < 1)
    assert bool(keep[1][minimum].all()) and int(keep[1].sum()) <= int(minimum.sum()) + 1


def test_observe_ablation_gives_stats_every_policy_reads():
    torch.manual_seed(1)
    model = tm.llama(seed=1)
    batches = [{"input_ids": torch.randint(3, tm.VOCAB, (1, 16))}]
    stats = observe(model, batches, granularity=4, score="ablation", progress=False)
    assert stats.score == "ablation" and stats.granularity == 4 and stats.num_sequences == 1
    for name in ("elastic", "elastic-site", "layer", "streaming", "structured"):
        masks = POLICIES.get(name)(_units_of(stats), 0.5, torch.Generator().manual_seed(0))
        assert all(m.dtype == torch.bool and m.any() for m in masks)


def test_ablation_refuses_what_it_cannot_measure():
    model = tm.llama(seed=1)
    ids = {"input_ids": torch.randint(3, tm.VOCAB, (1, 8))}
    with pytest.raises(InvalidArgumentError, match="needs blocks"):
        observe(model, [ids], granularity=1, score="ablation", progress=False)
    with pytest.raises(EmptyDatasetError):
        measure_bands(model, [], granularity=4, progress=False)
    with pytest.raises(InvalidArgumentError, match="configs_per_forward"):
        measure_bands(model, [ids], granularity=4, configs_per_forward=0, progress=False)
    with pytest.raises(InvalidArgumentError, match="logits"):
        measure_bands(tm.bert(), [tm.batch([6, 4])], granularity=2, progress=False)
    bart = tm.bart()
    b = tm.batch([6, 4])
    b["decoder_input_ids"] = tm.batch([5, 3])["input_ids"]
    with pytest.raises(InvalidArgumentError, match="cross-attention"):
        measure_bands(bart, [b], granularity=2, progress=False)


def test_default_widths_stay_below_the_grid():
    assert default_widths(5) == [1, 2, 3, 4]
    assert default_widths(64) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48]
    assert default_widths(1) == []


def test_sweep_profiles_only_the_first_ablation_batches():
    from attnprune.experiments.sweep_loop import SweepConfig, sweep
    from attnprune.models import load_model

    lm = load_model("tiny-llama")
    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(3, lm.vocab_size, (n, 16), generator=g)} for n in (1, 2)]
    test = [{"input_ids": torch.randint(3, lm.vocab_size, (2, 16), generator=g)}]
    cfg = SweepConfig(sparsities=(0.5,), policies=("elastic",), blocks=(8,), scores=("ablation",), ablation_batches=1,
                      ablation_base=1, ablation_widths=(2,))
    result, stats, _ = sweep(lm.model, calib, test, config=cfg, progress=False)
    assert stats.score == "ablation" and stats.num_sequences == 1  # the second batch (2 sequences) not profiled
    assert stats.description.endswith("around a band of 1 blocks")
    assert len(result.runs) == 1 and result.runs[0]["score"] == "ablation"
    with pytest.raises(InvalidArgumentError, match="ablation_batches"):
        SweepConfig(scores=("ablation",), blocks=(8,), ablation_batches=0)
    with pytest.raises(InvalidArgumentError, match="ablation_widths"):
        SweepConfig(scores=("ablation",), blocks=(8,), ablation_widths=(0, 2))
    with pytest.raises(InvalidArgumentError, match="only block sizes"):
        SweepConfig(scores=("ablation",), blocks=(None, 8))


def test_band_scores_around_a_baseline_stop_at_the_widest_width():
    """Measured around a pruned baseline (``dense_end=False``) the changes are relative to it (negative for
    wider bands): band k keeps ``const - (delta[k] - delta[widest])``, and nothing past the widest width."""
    delta = torch.tensor([[0.3, 0.0, -0.1, -0.15]], dtype=torch.float64)
    widths = [1, 2, 3, 4]
    sums, count = band_scores(delta, widths, "causal", 64, 64, 8, 1, dense_end=False)
    r, c = torch.arange(8)[:, None], torch.arange(8)[None, :]
    kept = lambda k: float(sums[0][((r - c >= 0) & (r - c < k)) | (c < 1)].sum())
    for w, d in zip(widths, [0.45, 0.15, 0.05, 0.0]):
        assert math.isclose(kept(8) - kept(w), d, rel_tol=1e-12, abs_tol=1e-15)
    with pytest.raises(InvalidArgumentError, match="base"):
        profile_bands(tm.llama(), [{"input_ids": torch.ones(1, 8, dtype=torch.long)}], granularity=4, base=0,
                      progress=False)


def test_band_scores_keep_what_is_narrower_than_the_grid():
    """A grid that starts above 1 diagonal measured nothing narrower: the diagonals inside its narrowest
    width are kept as structure (the head's top score per entry, like the main diagonal), not given zero
    score (which let ``elastic`` cut the second diagonal and keep farther ones: SmolLM2 at 8k, x1.20)."""
    delta = torch.tensor([[0.4, 0.1, 0.0], [0.02, 0.01, 0.0]], dtype=torch.float64)
    widths = [3, 4, 6]
    L, g, sinks = 64, 8, 1
    sums, count = band_scores(delta, widths, "causal", L, L, g, sinks)
    r, c = torch.arange(8)[:, None], torch.arange(8)[None, :]
    dens = sums / count.clamp_min(1)
    inner = (r - c >= 0) & (r - c < 3) & (c >= sinks)
    outer = (r - c >= 3) & (c >= sinks)
    for h in range(2):
        top = dens[h][(r == c)].max()  # top * count / count: two roundings of float64 at most
        torch.testing.assert_close(dens[h][inner], top.expand(int(inner.sum())), rtol=4 * EPS64, atol=0.0)
        assert torch.all(dens[h][inner].min() >= dens[h][outer].max() * (1 - 4 * EPS64))
        kept = lambda k: float(sums[h][((r - c >= 0) & (r - c < k)) | (c < sinks)].sum())
        for w, d in zip(widths, delta[h].tolist()):  # the measured widths still reproduce their losses
            assert math.isclose(kept(8) - kept(w), d, rel_tol=1e-12, abs_tol=1e-15)
