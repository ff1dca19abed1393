"""The length-free form (sinks + band per head) and ``beyond="extend"``."""

import pytest
import torch

from attnprune import PrunedKVCache, apply
from attnprune.errors import LengthError
from attnprune.lengthfree import LengthFree
from attnprune.mask import PruneMask, SiteMask
from attnprune.sites import SiteInfo
from lm_helpers import V, _close, _family, _generate, _mask


def _band(L, sinks, width, H=2):
    """bool [H, L, L]: ``sinks`` leading columns + a causal band of ``width(r)`` ending at the diagonal."""
    r, c = torch.arange(L)[:, None], torch.arange(L)[None, :]
    w = torch.tensor([width(i) for i in range(L)])[:, None]
    keep = ((c < sinks) | ((r - c >= 0) & (r - c < w))) & (c <= r)
    return keep.expand(H, L, L).clone()


def test_fit_recovers_a_constant_sink_and_band_and_continues_it():
    keep = _band(64, 3, lambda r: 5)
    lf = LengthFree.fit(keep[:, :32, :32], "causal")
    assert lf.sinks.tolist() == [3, 3]
    torch.testing.assert_close(lf.growth, torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(lf.band, torch.full((2,), 5.0, dtype=torch.float64))
    grid = lf.grid(torch.arange(64), torch.arange(64)) & torch.ones(64, 64, dtype=torch.bool).tril()
    assert torch.equal(grid[:, 32:], keep[:, 32:])  # the rows past the calibration, exactly


def test_fit_follows_a_growing_band():
    """A band widening by one key every 4 rows: the fit's width stays within one of it past the
    calibration (least squares over integer widths)."""
    width = lambda r: 2 + r // 4
    lf = LengthFree.fit(_band(48, 1, width)[:, :48, :48], "causal")
    assert 0.2 < float(lf.growth[0]) < 0.3
    got = lf.width(torch.arange(48, 128))[0]
    want = torch.tensor([float(width(r)) for r in range(48, 128)], dtype=torch.float64)
    assert (got - want).abs().max() <= 1.0


def test_last_row_is_the_last_row_reading_each_column():
    """PrunedKVCache drops a key after ``last_row``: it must never be earlier than the last row of
    the form that reads the key, and at most one row later."""
    for width in (lambda r: 4, lambda r: 2 + r // 3):
        lf = LengthFree.fit(_band(40, 2, width)[:, :40, :40], "causal")
        rows, cols = torch.arange(400), torch.arange(120)
        grid = lf.grid(rows, cols) & (cols[None, :] <= rows[:, None])
        last = lf.last_row(cols)
        for c in range(2, 120):
            true_last = int(rows[grid[0, :, c]].max())
            assert true_last <= int(last[0, c]) <= true_last + 1, c
        assert (last[:, :2] > 10**15).all()  # sinks: read forever


def _model_and_mask():
    model = _family("llama")
    return model, _mask(model)


def test_extend_equals_the_materialised_mask_and_keeps_the_calibrated_region():
    model, mask = _model_and_mask()
    ext = mask.extend(80)
    for s in mask.sites:
        assert torch.equal(ext.site(s).keep[:, :32, :32], mask.site(s).keep)
    ids = torch.randint(3, V, (2, 80), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        with apply(model, mask, beyond="extend"):
            got = model(ids).logits
        with apply(model, ext):
            want = model(ids).logits
        with apply(model, mask, beyond="dense"):
            dense = model(ids).logits
        with apply(model, mask):
            with pytest.raises(LengthError, match="beyond='extend'"):
                model(ids)
    _close(got, want)
    assert (got - dense).abs().max() > 1e-2  # extend is not dense


def test_block_masks_extend_by_blocks():
    from attnprune import make_mask, observe

    model = _family("llama")
    g = torch.Generator().manual_seed(1)
    stats = observe(model, [{"input_ids": torch.randint(3, V, (2, 32), generator=g)}], granularity=8,
                    progress=False)
    mask = make_mask(stats, 0.5, block=8)
    ext = mask.extend(64)
    s = ext.site(mask.sites[0])
    assert s.block == 8 and s.keep.shape[1:] == (8, 8)
    assert torch.equal(s.keep[:, :4, :4], mask.site(mask.sites[0]).keep)


def test_cross_attention_has_no_length_free_form():
    info = SiteInfo("dec.cross", "cross", 2, 2)
    mask = PruneMask([SiteMask(info, 4, 6, keep=torch.ones(2, 4, 6, dtype=torch.bool))], {})
    with pytest.raises(LengthError, match="cross-attention"):
        mask.extend(8)
    with pytest.raises(LengthError, match="cross-attention"):
        mask.site("dec.cross").keep_tokens(8, 6, beyond="extend")
    assert mask.site("dec.cross").keep_tokens(4, 6, beyond="extend").all()  # inside: fine


def _pruned_cache_equals_recomputation(model, mask, prompt, n):
    """``n`` tokens under ``beyond="extend"``: PrunedKVCache gives the tokens and logits of full
    recomputation; returns the cache."""
    with torch.no_grad(), apply(model, mask, beyond="extend"):
        cache = PrunedKVCache(model, mask)
        seq_p, log_p = _generate(model, prompt, n, past_key_values=cache)
        seq_n, log_n = _generate(model, prompt, n, use_cache=False)
    assert torch.equal(seq_p, seq_n)
    _close(log_p, log_n)
    return cache


@pytest.mark.parametrize("length_free", ["stats", "mask"])
@pytest.mark.parametrize("family", ["llama", "mistral-sliding"])
def test_generation_past_the_calibration_with_extend_and_pruned_cache(family, length_free):
    """64 tokens past a 32-token calibration, with the form fitted from the statistics (make_mask's
    default) or from the mask: the pruned cache gives what full recomputation under
    ``beyond="extend"`` gives, and holds less than a dense cache (the mask's own, narrower form
    under half of it)."""
    model = _family(family)
    mask = _mask(model, length_free=length_free)
    prompt = torch.randint(3, V, (1, 8), generator=torch.Generator().manual_seed(2))
    cache = _pruned_cache_equals_recomputation(model, mask, prompt, 88)
    # a sliding window of 4 already bounds the dense cache to 3 tokens: never more than that
    bound = 1.0 + 1e-9 if family.endswith("sliding") else (0.5 if length_free == "mask" else 1.0)
    assert cache.kv_bytes()["share"] < bound


def test_hold_density_keeps_the_calibrated_share_of_each_row():
    """hold="width" continues the line of kept counts per row, hold="density" the kept share: on a
    random mask keeping ~30% of each row both extend at ~30%; on a constant band of 5 the width rule
    keeps 5 per far row (~1%) and the density rule the calibrated rows' share (~14%)."""
    g = torch.Generator().manual_seed(3)
    L, H = 48, 2
    tril = torch.ones(L, L, dtype=torch.bool).tril()
    rand = (torch.rand(H, L, L, generator=g) < 0.3) & tril
    far = torch.arange(400, 480)
    for keep, bounds in ((rand, {"width": (0.22, 0.4), "density": (0.22, 0.4)}),
                         (_band(L, 0, lambda r: 5), {"width": (0.0, 0.03), "density": (0.1, 0.2)})):
        mask = PruneMask([SiteMask(SiteInfo("l0", "causal", H, H), L, L, keep=keep)], {})
        for hold, (lo, hi) in bounds.items():
            ext = mask.extend(480, hold=hold).site("l0").keep
            share = ext[:, far].sum(-1).double() / (far + 1).double()
            assert lo < float(share.mean()) < hi, hold
            assert torch.equal(ext[:, :L, :L], keep)
    with pytest.raises(Exception, match="hold"):
        mask.extend(64, hold="nope")


def test_pruned_cache_past_the_calibration_with_a_stats_fitted_form():
    """with_length_free(stats): the pruned cache continues the stats-fitted form exactly (the tokens and
    logits of full recomputation under beyond="extend"), and that form is not the mask's own."""
    from attnprune import make_mask, observe

    model = _family("llama")
    g = torch.Generator().manual_seed(1)
    stats = observe(model, [{"input_ids": torch.randint(3, V, (2, 32), generator=g)} for _ in range(2)],
                    progress=False)
    plain = make_mask(stats, 0.7)
    mask = plain.with_length_free(stats, mass=0.8)
    name = mask.sites[0]
    rows, cols = torch.arange(32, 96), torch.arange(96)
    assert not torch.equal(mask.site(name).length_free.grid(rows, cols), plain.site(name).length_free.grid(rows, cols))
    prompt = torch.randint(3, V, (1, 8), generator=g)
    _pruned_cache_equals_recomputation(model, mask, prompt, 88)
