"""``attnprune.apply.outside_counts``: attention entries computed outside the mask's calibrated region
(``beyond="dense"`` / ``"extend"``), per site, with one ``OutsideCalibrationWarning`` per attach (issue 13)."""

import warnings

import pytest
import torch

from attnprune import PrunedKVCache, apply
from attnprune.apply import OutsideCalibrationWarning, _entries, outside_counts
from attnprune.errors import InvalidArgumentError, LengthError
from lm_helpers import CAL, V, _family, _mask


def _brute(r0, r1, kmax, causal):
    return sum(1 for r in range(r0, r1) for c in range(kmax) if not causal or c <= r)


def _outside(L, cal):
    """Causal entries of one length-L sequence with the query or key position >= cal."""
    return sum(1 for r in range(L) for c in range(r + 1) if r >= cal or c >= cal)


@pytest.mark.parametrize("causal", [True, False])
def test_entries_closed_form_matches_counting(causal):
    for r0, r1, kmax in [(0, 0, 5), (0, 7, 7), (3, 9, 5), (0, 9, 12), (5, 6, 6), (10, 20, 4), (2, 8, 0)]:
        assert _entries(r0, r1, kmax, causal) == _brute(r0, r1, kmax, causal), (r0, r1, kmax)


@pytest.fixture(scope="module")
def lm():
    model = _family("llama")
    return model, _mask(model)


def _ids(B, L, seed=0):
    return torch.randint(3, V, (B, L), generator=torch.Generator().manual_seed(seed))


def test_inside_the_calibration_nothing_outside_and_no_warning(lm):
    model, mask = lm
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutsideCalibrationWarning)
        with apply(model, mask, beyond="extend"):
            model(_ids(2, CAL))
            c = outside_counts(model)
    assert c["beyond"] == "extend" and c["entries"] == 0 and c["calls"] == 0 and c["share"] == 0.0
    assert set(c["sites"]) == set(mask.sites)
    per_site = 2 * CAL * (CAL + 1) // 2
    assert all(s["total"] == per_site for s in c["sites"].values())
    assert c["total"] == per_site * len(mask.sites)


@pytest.mark.parametrize("beyond", ["dense", "extend"])
def test_past_the_calibration_counted_per_site_warned_once(lm, beyond):
    model, mask = lm
    L, B = CAL + 8, 3
    with pytest.warns(OutsideCalibrationWarning, match="calibrated length") as rec:
        with apply(model, mask, beyond=beyond):
            model(_ids(B, L))
            model(_ids(B, L, seed=1))
    assert len([w for w in rec if issubclass(w.category, OutsideCalibrationWarning)]) == 1
    c = outside_counts(model)  # after the with block: the last attachment's counts
    want = B * _outside(L, CAL)
    for s in c["sites"].values():
        assert s["calls"] == 2 and s["entries"] == 2 * want and s["total"] == 2 * B * L * (L + 1) // 2
    assert c["share"] == pytest.approx(want / (B * L * (L + 1) // 2))
    outside_counts(model, reset=True)
    assert outside_counts(model)["total"] == 0


def test_error_raises_and_counts_nothing_outside(lm):
    model, mask = lm
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutsideCalibrationWarning)
        with apply(model, mask):
            with pytest.raises(LengthError):
                model(_ids(1, CAL + 1))
            c = outside_counts(model)
    assert c["beyond"] == "error" and c["entries"] == 0


def test_padding_past_the_calibration_is_not_counted(lm):
    """A right-padded batch longer than the calibration whose real tokens fit: runs under "error",
    and nothing is counted outside under "extend" either."""
    model, mask = lm
    am = torch.zeros(2, CAL + 6, dtype=torch.long)
    am[0, :CAL], am[1, :CAL - 4] = 1, 1
    for beyond in ("error", "extend"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", OutsideCalibrationWarning)
            with apply(model, mask, beyond=beyond):
                model(input_ids=_ids(2, CAL + 6), attention_mask=am)
        assert outside_counts(model)["entries"] == 0, beyond


def test_generation_past_the_calibration_counts_the_decode_steps(lm):
    """Greedy decoding with a PrunedKVCache from a prompt inside the calibration to past it: the
    prompt counts nothing outside, each step at position p >= CAL counts its p + 1 keys."""
    model, mask = lm
    P, n = CAL - 4, 12
    with pytest.warns(OutsideCalibrationWarning):
        with apply(model, mask, beyond="extend"):
            cache = PrunedKVCache(model, mask)
            model.generate(_ids(1, P), past_key_values=cache, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
    c = outside_counts(model)
    # generate feeds tokens P .. P+n-2 after the prompt (the last new token is not fed back)
    want = sum(p + 1 for p in range(CAL, P + n - 1))
    assert all(s["entries"] == want for s in c["sites"].values()), c["sites"]
    assert all(s["calls"] == P + n - 1 - CAL for s in c["sites"].values())


def test_a_new_attach_starts_from_zero_and_never_attached_is_an_error(lm):
    model, mask = lm
    with apply(model, mask, beyond="dense"):
        with pytest.warns(OutsideCalibrationWarning):
            model(_ids(1, CAL + 2))
        assert outside_counts(model)["entries"] > 0
    with apply(model, mask, beyond="dense"):
        assert outside_counts(model)["total"] == 0
    with pytest.raises(InvalidArgumentError):
        outside_counts(_family("gpt2"))
