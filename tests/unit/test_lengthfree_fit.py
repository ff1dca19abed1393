"""The length-free form fitted from attention statistics (``LengthFree.fit_mass``, ``hold="mass"``)."""

import pytest
import torch

from attnprune import make_mask
from attnprune.errors import InvalidArgumentError, LengthError, MaskMismatchError
from attnprune.experiments.extend import parse_hold
from attnprune.lengthfree import LengthFree, kept_mass
from attnprune.mask import PruneMask, SiteMask
from attnprune.sites import SiteInfo
from attnprune.stats import AttentionStats

# fit_mass asks each row for ``mass * row * (1 - 1e-9)``; float64 sums of <= 256 terms of size <= 1
# are off by far less than 1e-12 of the row, so a kept share below mass * (1 - 2e-9) is a real miss
SLACK = 2e-9


def _structured(L, heads, p=0.9):
    """float64 [H, L, L] causal rows summing to 1: share ``p`` spread evenly over each head's sinks
    ``s`` and band ``0 <= r - c < w`` (``heads``: [(s, w), ...]), the rest evenly over the other keys."""
    r, c = torch.arange(L)[:, None], torch.arange(L)[None, :]
    out = []
    for s, w in heads:
        struct = ((c < s) | ((r - c >= 0) & (r - c < w))) & (c <= r)
        other = (c <= r) & ~struct
        ns, no = struct.sum(1, keepdim=True).double(), other.sum(1, keepdim=True).double()
        rows = torch.where(struct, p / ns, torch.where(other, (1 - p) / no.clamp_min(1), 0.0))
        rows = torch.where(no == 0, struct / ns, rows)  # rows with nothing else: all on the structure
        out.append(rows)
    return torch.stack(out)


def _random_rows(H, L, kind, seed):
    """float64 [H, L, L] rows of a softmax over random logits with a pull towards the diagonal and
    the first key (causal: keys <= query)."""
    g = torch.Generator().manual_seed(seed)
    r, c = torch.arange(L)[:, None], torch.arange(L)[None, :]
    logits = 2 * torch.randn(H, L, L, generator=g, dtype=torch.float64) - 0.2 * (r - c).abs() + 3.0 * (c == 0)
    if kind == "causal":
        logits = logits.masked_fill(c > r, float("-inf"))
    return logits.softmax(-1)


def _kept_share(lf, score, kind):
    """float64 [H, F]: the share of each fitted row's mass the form keeps (the last half of the rows)."""
    H, R, C = score.shape
    rows, cols = torch.arange(R // 2, R), torch.arange(C)
    grid = lf.grid(rows, cols)
    if kind == "causal":
        grid = grid & (cols[None, :] <= rows[:, None])
    x = score[:, rows]
    return (x * grid).sum(-1) / x.sum(-1)


def test_fit_mass_recovers_known_sinks_and_band():
    """Share 0.9 on (1 sink, band 8) and on (4 sinks, band 3); asked for 0.9, the cheapest form is
    exactly that structure, constant over the rows."""
    score = _structured(64, [(1, 8), (4, 3)])
    lf = LengthFree.fit_mass(score, "causal", 0.9)
    assert lf.sinks.tolist() == [1, 4]
    assert lf.band.tolist() == [8.0, 3.0]
    assert lf.growth.tolist() == [0.0, 0.0]
    assert (_kept_share(lf, score, "causal") >= 0.9 * (1 - SLACK)).all()


def test_fit_mass_follows_a_growing_band():
    """The structure's band widens by one key every 4 rows: the fitted growth is the least-squares
    slope of those widths over the fitted rows, and the line covers every fitted row's width."""
    L = 96
    width = lambda r: 2 + r // 4
    r, c = torch.arange(L)[:, None], torch.arange(L)[None, :]
    w = torch.tensor([width(i) for i in range(L)])[:, None]
    struct = (r - c >= 0) & (r - c < w)
    other = (c <= r) & ~struct
    ns, no = struct.sum(1, keepdim=True).double(), other.sum(1, keepdim=True).double().clamp_min(1)
    score = torch.where(struct, 0.95 / ns, torch.where(other, 0.05 / no, 0.0))[None]  # float64
    lf = LengthFree.fit_mass(score, "causal", 0.95, max_sinks=0)
    fr = torch.arange(L // 2, L).double()
    ws = torch.tensor([float(width(int(i))) for i in fr], dtype=torch.float64)
    rc = fr - fr.mean()
    slope = float((ws - ws.mean()) @ rc / (rc @ rc))
    assert float(lf.growth[0]) == pytest.approx(slope, abs=1e-12)
    assert 0.24 < slope < 0.26
    # the line is the least-squares one raised onto the highest width: above every row, and above by
    # less than the staircase's spread around a line of that slope (0.75 + |slope - 1/4| * 48 < 1)
    over = lf.width(fr)[0] - ws
    assert float(over.min()) >= -1e-9 and float(over.max()) < 1.0
    assert (_kept_share(lf, score, "causal") >= 0.95 * (1 - SLACK)).all()


@pytest.mark.parametrize("kind", ["causal", "self"])
@pytest.mark.parametrize("mass", [0.3, 0.7, 0.9, 0.99, 1.0])
def test_every_fitted_row_keeps_the_requested_mass(kind, mass):
    score = _random_rows(3, 48, kind, seed=int(mass * 100))
    lf = LengthFree.fit_mass(score, kind, mass)
    assert (_kept_share(lf, score, kind) >= mass * (1 - SLACK)).all()


def test_per_head_mass_and_the_more_mass_the_more_kept():
    score = _random_rows(2, 48, "causal", seed=5)
    lo, hi = LengthFree.fit_mass(score, "causal", 0.5), LengthFree.fit_mass(score, "causal", 0.95)
    both = LengthFree.fit_mass(score, "causal", torch.tensor([0.5, 0.95]))
    rows, cols = torch.arange(24, 48), torch.arange(48)
    n = lambda lf: lf.grid(rows, cols).sum((1, 2))
    assert (n(lo) <= n(hi)).all() and int(n(lo).sum()) < int(n(hi).sum())
    assert n(both).tolist() == [int(n(lo)[0]), int(n(hi)[1])]


def _reference_fit_mass(score, kind, mass, grow=True, max_sinks=None):
    """The documented rule of ``LengthFree.fit_mass``, written out plainly: per candidate sink count
    ``s``, each fitted row's mass by distance outside the sinks, summed in order of the distance onto
    the sinks' mass; the band reaches the first distance that covers the need; the line through the
    rows' widths; the entries kept counted on the grid. Returns (sinks, band, growth)."""
    H, R, C = score.shape
    causal = kind == "causal"
    cap = min(max(1, C // 4) if max_sinks is None else max_sinks, C)
    rows = torch.arange(R // 2, R) if R > 1 else torch.arange(R)
    F, r = len(rows), rows.double()
    x = torch.nan_to_num(score[:, rows].double(), nan=0.0).clamp_min(0.0)
    m = torch.as_tensor(mass, dtype=torch.float64).flatten().expand(H)
    need = m[:, None] * x.sum(-1) * (1 - 1e-9)
    cols = torch.arange(C)
    dist = rows[:, None] - cols[None, :]
    if not causal:
        dist = dist.abs()
    ok = dist >= 0
    rc = r - r.mean()
    best = None
    for s in range(cap + 1):
        sink = x[:, :, :s].sum(-1)
        prof = torch.zeros(H, F, C + R, dtype=torch.float64)
        prof.scatter_add_(2, dist.clamp_min(0).expand(H, F, C), x * ((cols >= s) & ok))
        cum = prof.cumsum(-1) + sink[..., None]
        k = (cum < need[..., None]).sum(-1).double()
        w = k + 1 if causal else 2 * k + 1
        if grow and F > 1:
            g = ((w - w.mean(1, keepdim=True)) @ rc / (rc @ rc)).clamp_min(0.0)
        else:
            g = torch.zeros(H, dtype=torch.float64)
        a = (w - g[:, None] * r).max(1).values
        width = (a[:, None, None] + g[:, None, None] * rows.double()[None, :, None]).clamp_min(1.0)
        d = (rows[:, None] - cols[None, :]).double()
        band = (d >= 0) & (d < width) if causal else d.abs() < (width + 1) / 2
        kept = ((band | (cols < s)) & ok).sum((1, 2))
        if best is None:
            best = [kept, torch.full((H,), s), a, g]
            continue
        better = kept < best[0]
        best = [torch.where(better, new, old) for new, old in zip((kept, torch.full((H,), s), a, g), best)]
    return best[1], best[2], best[3]


_ODD_SHAPES = [  # (H, R, C, max_sinks): square and not, one row, few columns, max_sinks 0 and past C
    (1, 1, 1, None), (2, 2, 5, None), (3, 17, 17, None), (2, 31, 9, 1000), (1, 9, 40, 1000),
    (3, 40, 40, 0), (2, 23, 37, 7), (4, 64, 64, None), (1, 6, 6, 1000), (2, 50, 13, None),
]


@pytest.mark.parametrize("kind", ["causal", "self"])
@pytest.mark.parametrize("shape", _ODD_SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_mass_is_the_documented_rule_exactly(kind, shape, seed):
    """The fast fit (all sink counts at once) against the plain per-``s`` loop of the documented
    rule, on random scores with zeros and NaNs, per-head and single shares, with and without growth:
    the same sinks, and band and growth to the bit (the fit makes the very same float64 sums)."""
    H, R, C, max_sinks = shape
    g = torch.Generator().manual_seed(1000 * seed + R * 7 + C)
    score = torch.rand(H, R, C, generator=g, dtype=torch.float64) ** (1 + 4 * seed)
    score[torch.rand(H, R, C, generator=g) < 0.25] = 0.0
    score[torch.rand(H, R, C, generator=g) < 0.05] = float("nan")
    if seed == 1:  # peaked rows: a heavy first key and diagonal, a tail of tiny entries
        rr, cc = torch.arange(R)[:, None], torch.arange(C)[None, :]
        score = score * 1e-12 + 5.0 * (cc == 0) + 2.0 * (rr == cc)
    if kind == "causal" and seed == 2:  # attention-like: nothing past the diagonal
        score = score.masked_fill(torch.arange(C)[None, :] > torch.arange(R)[:, None], float("nan"))
    for mass in (0.5, 0.97, 1.0, torch.rand(H, generator=g, dtype=torch.float64).clamp_min(0.01)):
        for grow in (True, False):
            lf = LengthFree.fit_mass(score.float() if seed == 0 else score, kind, mass, grow=grow,
                                     max_sinks=max_sinks)
            sinks, band, growth = _reference_fit_mass(score.float() if seed == 0 else score, kind, mass,
                                                      grow=grow, max_sinks=max_sinks)
            assert lf.sinks.tolist() == sinks.tolist()
            assert torch.equal(lf.band, band) and torch.equal(lf.growth, growth)
            assert lf.causal == (kind == "causal")


def test_fit_mass_matches_the_rule_on_attention_rows():
    """Softmax rows at a realistic size (the cheapest form has sinks and a wide band)."""
    for kind in ("causal", "self"):
        score = _random_rows(3, 96, kind, seed=3)
        for mass in (0.6, 0.9, 0.999):
            lf = LengthFree.fit_mass(score, kind, mass)
            sinks, band, growth = _reference_fit_mass(score, kind, mass)
            assert lf.sinks.tolist() == sinks.tolist()
            assert torch.equal(lf.band, band) and torch.equal(lf.growth, growth)


def _stats_and_mask(sparsity=0.5, L=32, H=2, kind="causal", length_free="mask"):
    info = SiteInfo("l0", kind, H, H)
    probs = _random_rows(H, L, kind, seed=11)
    count = torch.ones(L, L, dtype=torch.float64)
    if kind == "causal":
        count = count.tril()
    stats = AttentionStats([info])
    stats.add("l0", probs * count, count)
    return stats, make_mask(stats, sparsity, length_free=length_free), probs


def test_kept_mass_is_the_share_of_the_fitted_rows():
    stats, mask, probs = _stats_and_mask()
    keep = mask.site("l0").keep
    want = (probs[:, 16:] * keep[:, 16:]).sum((1, 2)) / probs[:, 16:].sum((1, 2))
    torch.testing.assert_close(kept_mass(keep, probs), want, rtol=1e-12, atol=0)
    with pytest.raises(InvalidArgumentError, match="shape"):
        kept_mass(keep[:, :4], probs)


def test_extend_hold_mass_keeps_the_mask_and_at_least_its_mass():
    """hold="mass" (mass=None): the calibrated region as it was, and the continued form keeps per
    head at least the share of the fitted rows' mass the mask keeps there."""
    stats, mask, probs = _stats_and_mask()
    sm = mask.site("l0")
    ext = mask.extend(80, hold="mass", stats=stats)
    assert ext.meta["extended_hold"] == "mass" and ext.meta["extended_mass"] == "kept"
    assert torch.equal(ext.site("l0").keep[:, :32, :32], sm.keep)
    lf = LengthFree.fit_mass(probs.float(), "causal", kept_mass(sm.keep, probs))
    share = _kept_share(lf, probs, "causal")
    assert (share >= kept_mass(sm.keep, probs)[:, None] * (1 - SLACK)).all()
    rows = torch.arange(32, 80)
    assert torch.equal(ext.site("l0").keep[:, 32:], lf.grid(rows, torch.arange(80)))
    fixed = mask.extend(80, hold="mass", stats=stats, mass=0.99)
    assert fixed.meta["extended_mass"] == 0.99
    assert int(fixed.site("l0").keep[:, 32:].sum()) >= int(ext.site("l0").keep[:, 32:].sum())


def test_bad_arguments():
    stats, mask, probs = _stats_and_mask()
    for bad in (0.0, -0.1, 1.5, float("nan"), [0.5, 0.5, 0.5]):
        with pytest.raises(InvalidArgumentError, match="mass"):
            LengthFree.fit_mass(probs, "causal", bad)
    with pytest.raises(InvalidArgumentError, match=r"\[H, R, C\]"):
        LengthFree.fit_mass(probs[0], "causal", 0.5)
    with pytest.raises(InvalidArgumentError, match="max_sinks"):
        LengthFree.fit_mass(probs, "causal", 0.5, max_sinks=-1)
    with pytest.raises(LengthError, match="cross-attention"):
        LengthFree.fit_mass(probs, "cross", 0.5)
    with pytest.raises(InvalidArgumentError, match="needs the attention statistics"):
        mask.extend(64, hold="mass")
    with pytest.raises(InvalidArgumentError, match="for hold='mass'"):
        mask.extend(64, hold="width", stats=stats)
    with pytest.raises(InvalidArgumentError, match="hold must be"):
        mask.extend(64, hold="mas")
    other, _, _ = _stats_and_mask(L=16)
    with pytest.raises(MaskMismatchError, match="grid"):
        mask.extend(64, hold="mass", stats=other)
    renamed = PruneMask([SiteMask(SiteInfo("l9", "causal", 2, 2), 32, 32, keep=mask.site("l0").keep)], {})
    with pytest.raises(MaskMismatchError, match="no site 'l9'"):
        renamed.extend(64, hold="mass", stats=stats)
    for spec in ("mass:x", "width:0.5", "nope"):
        with pytest.raises(InvalidArgumentError):
            parse_hold(spec)
    assert parse_hold("mass:0.9") == ("mass", 0.9) and parse_hold("width") == ("width", None)


def test_an_extended_mask_continues_its_mass_form_under_beyond_extend():
    """``mask.extend(L, hold="mass", stats=...)`` materialised, then used past ``L`` with
    ``beyond="extend"``: its own (width) form, fitted from the extended rows, is the mass form."""
    L, H = 64, 2
    probs = _structured(L, [(1, 8), (4, 3)])
    count = torch.ones(L, L, dtype=torch.float64).tril()
    stats = AttentionStats([SiteInfo("l0", "causal", H, H)])
    stats.add("l0", probs * count, count)
    mask = make_mask(stats, 0.5)
    form = LengthFree.fit_mass(stats.mean("l0"), "causal", 0.9)
    ext = mask.extend(128, hold="mass", stats=stats, mass=0.9)
    again = ext.site("l0").length_free
    assert again.sinks.tolist() == form.sinks.tolist()
    torch.testing.assert_close(again.band, form.band)
    torch.testing.assert_close(again.growth, form.growth)
    far = ext.site("l0").keep_tokens(200, 200, beyond="extend")[:, 128:]
    assert torch.equal(far, form.grid(torch.arange(128, 200), torch.arange(200)))


def test_with_length_free_is_what_beyond_extend_continues_and_survives_a_file(tmp_path):
    """mask.with_length_free(stats): past the calibration, beyond='extend' reads the stats-fitted form
    (not the mask's own, which differs here), the calibrated region is unchanged, and save/load keeps
    the form (a mask file without it falls back to the mask's own)."""
    from attnprune.lengthfree import site_form

    stats, mask, probs = _stats_and_mask()
    sm = mask.site("l0")
    fitted = mask.with_length_free(stats)
    assert fitted.meta["length_free"] == {"rule": "mass", "mass": "kept"} and "length_free" not in mask.meta
    want = site_form(sm, "mass", stats=stats)
    rows, cols = torch.arange(32, 70), torch.arange(70)
    own = sm.length_free.grid(rows, cols)
    new = fitted.site("l0").length_free.grid(rows, cols)
    assert torch.equal(new, want.grid(rows, cols)) and not torch.equal(new, own)
    far = fitted.site("l0").keep_tokens(70, 70, beyond="extend")
    assert torch.equal(far[:, :32, :32], sm.keep) and torch.equal(far[:, 32:], new)
    assert torch.equal(far, fitted.extend(70).site("l0").keep)  # extend() uses the same form
    path = tmp_path / "m.safetensors"
    fitted.save(path)
    back = PruneMask.load(path)
    assert back.site("l0").length_free_fitted and back.meta["length_free"]["rule"] == "mass"
    assert torch.equal(back.site("l0").keep_tokens(70, 70, beyond="extend"), far)
    mask.save(tmp_path / "plain.safetensors")
    plain = PruneMask.load(tmp_path / "plain.safetensors")
    assert not plain.site("l0").length_free_fitted
    assert torch.equal(plain.site("l0").length_free.grid(rows, cols), own)


def test_mask_command_extend_mass(tmp_path, capsys):
    """`attnprune mask --extend-mass`: the file carries the stats-fitted form; a bad share stops with
    one clear error before anything is written."""
    from attnprune.cli import main

    stats, mask, _ = _stats_and_mask()
    stats.save(tmp_path / "s.safetensors")
    out = tmp_path / "m.safetensors"
    assert main(["mask", str(tmp_path / "s.safetensors"), "--sparsity", "0.5", "--extend-mass", "0.9",
                 "-o", str(out)]) == 0
    m = PruneMask.load(out)
    assert m.meta["length_free"] == {"rule": "mass", "mass": 0.9} and m.site("l0").length_free_fitted
    capsys.readouterr()
    bad = tmp_path / "bad.safetensors"
    assert main(["mask", str(tmp_path / "s.safetensors"), "--sparsity", "0.5", "--extend-mass", "2",
                 "-o", str(bad)]) != 0
    err = capsys.readouterr().err
    assert "--extend-mass" in err and "Traceback" not in err and not bad.exists()


def test_make_mask_continues_with_the_stats_form_by_default(tmp_path):
    """make_mask's default: past the calibration, beyond='extend' and extend() continue the form fitted
    from the statistics (hold='mass' at the kept share), not the mask's own (which differs here); it is
    fitted on first use only, and a saved file keeps it; length_free='mask' keeps the old behaviour."""
    from unittest import mock

    from attnprune.lengthfree import site_form

    stats, own, _ = _stats_and_mask()
    with mock.patch.object(LengthFree, "fit_mass", wraps=LengthFree.fit_mass) as fits:
        mask = make_mask(stats, 0.5)
        assert fits.call_count == 0  # nothing fitted yet
        assert mask.site("l0").length_free_fitted and mask.meta["length_free"] == {"rule": "mass", "mass": "kept"}
        rows, cols = torch.arange(32, 70), torch.arange(70)
        got = mask.site("l0").length_free.grid(rows, cols)
        mask.site("l0").length_free
        assert fits.call_count == 1  # once, then kept
    want = site_form(own.site("l0"), "mass", stats=stats).grid(rows, cols)
    mine = own.site("l0").length_free.grid(rows, cols)
    assert torch.equal(got, want) and not torch.equal(got, mine)
    assert torch.equal(mask.site("l0").keep, own.site("l0").keep)  # the calibrated region is the same mask
    far = mask.site("l0").keep_tokens(70, 70, beyond="extend")
    assert torch.equal(far[:, 32:], want) and torch.equal(far, mask.extend(70).site("l0").keep)
    assert torch.equal(mask.extend(70, hold="width").site("l0").keep, own.extend(70).site("l0").keep)
    assert not own.site("l0").length_free_fitted and "length_free" not in own.meta
    path = tmp_path / "m.safetensors"
    make_mask(stats, 0.5).save(path)  # saving fits the form and keeps it
    back = PruneMask.load(path)
    assert back.site("l0").length_free_fitted and torch.equal(back.site("l0").length_free.grid(rows, cols), want)


def test_make_mask_stats_form_refuses_changed_stats_and_bad_arguments():
    """The form is fitted on first use from the stats the mask was made from: if they gained
    observations since, one clear error instead of a form from other data; a bad length_free is refused."""
    from attnprune.errors import InvalidArgumentError, MaskMismatchError

    stats, _, probs = _stats_and_mask()
    mask = make_mask(stats, 0.5)
    count = torch.ones(32, 32, dtype=torch.float64).tril()
    stats.add("l0", probs * count, count)
    with pytest.raises(MaskMismatchError, match="changed since"):
        mask.site("l0").keep_tokens(40, 40, beyond="extend")
    with pytest.raises(InvalidArgumentError, match="length_free"):
        make_mask(stats, 0.5, length_free="width")


def test_mask_command_length_free(tmp_path, capsys):
    """`attnprune mask`: the file carries the stats-fitted form by default, the mask's own with
    --length-free mask; --extend-mass with --length-free mask stops with one clear error, no file."""
    from attnprune.cli import main

    stats, mask, _ = _stats_and_mask()
    stats.save(tmp_path / "s.safetensors")
    rows, cols = torch.arange(32, 70), torch.arange(70)
    forms = {}
    for flag in ([], ["--length-free", "mask"]):
        out = tmp_path / f"m{len(flag)}.safetensors"
        assert main(["mask", str(tmp_path / "s.safetensors"), "--sparsity", "0.5", *flag, "-o", str(out)]) == 0
        forms[bool(flag)] = PruneMask.load(out).site("l0")
    assert forms[False].length_free_fitted and not forms[True].length_free_fitted
    assert torch.equal(forms[True].length_free.grid(rows, cols), mask.site("l0").length_free.grid(rows, cols))
    assert torch.equal(forms[False].length_free.grid(rows, cols),
                       make_mask(stats, 0.5).site("l0").length_free.grid(rows, cols))
    capsys.readouterr()
    bad = tmp_path / "bad.safetensors"
    assert main(["mask", str(tmp_path / "s.safetensors"), "--sparsity", "0.5", "--length-free", "mask",
                 "--extend-mass", "0.9", "-o", str(bad)]) != 0
    err = capsys.readouterr().err
    assert "--extend-mass" in err and "Traceback" not in err and not bad.exists()
