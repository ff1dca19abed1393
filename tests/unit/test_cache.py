"""PrunedKVCache: generation with a cache holding only what the mask still reads gives the same
tokens and logits as masked full recomputation, and holds fewer bytes than a dense cache."""

import pytest
import torch

from attnprune import PrunedKVCache, apply
from attnprune.errors import InvalidArgumentError, LengthError, UnsupportedModelError
from attnprune.mask import PruneMask, SiteMask
from lm_helpers import CAL, PROMPT, V, _close, _family, _generate, _left_padded, _mask


def _prompt(n=PROMPT, seed=2, batch=1):
    return torch.randint(3, V, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "mistral-sliding", "gemma3", "gpt-neox"])
def test_pruned_cache_generate_equals_full_recomputation(family):
    model = _family(family)
    mask = _mask(model)
    with torch.no_grad(), apply(model, mask):
        cache = PrunedKVCache(model, mask)
        seq_p, log_p = _generate(model, _prompt(), CAL - PROMPT, past_key_values=cache)
        seq_n, log_n = _generate(model, _prompt(), CAL - PROMPT, use_cache=False)
    assert torch.equal(seq_p, seq_n)
    _close(log_p, log_n)
    b = cache.kv_bytes()
    assert 0 < b["held"] < b["dense"] and b["held"] <= b["allocated"]


def _band_mask(model, L, sinks, band):
    """A hand-built sink + local-band mask (token level) for every site of ``model``."""
    from attnprune.capture import intercept

    infos = {}
    with torch.no_grad(), intercept(model, lambda c: infos.setdefault(c.site, c.info) and None):
        model(torch.zeros(1, 4, dtype=torch.long))
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    keep = ((j < sinks) | ((i - j >= 0) & (i - j < band))) & (j <= i)
    sms = [SiteMask(info, L, L, keep=keep.expand(info.num_heads, L, L).clone()) for info in infos.values()]
    return PruneMask(sms, {"model": {"name": "tiny"}}), keep


@pytest.mark.slow
def test_sink_and_band_mask_holds_sinks_plus_band_only():
    """90% sparsity as 4 sinks + a 20-wide band at 512 tokens: between steps the cache keeps the
    sinks and the band's last 19 positions per head (4.5% of a dense cache), nothing more."""
    model = _family("llama")
    L, sinks, band = 512, 4, 20
    mask, keep = _band_mask(model, L, sinks, band)
    sparsity = 1 - keep.sum().item() / (L * (L + 1) / 2)
    assert sparsity > 0.9
    with torch.no_grad(), apply(model, mask):
        cache = PrunedKVCache(model, mask)
        seq_p, log_p = _generate(model, _prompt(), L - PROMPT, past_key_values=cache)
        seq_n, log_n = _generate(model, _prompt(), L - PROMPT, use_cache=False)
    assert torch.equal(seq_p, seq_n)
    _close(log_p, log_n)
    b = cache.kv_bytes()
    seen = L - 1  # the last new token is returned, not fed back
    assert b["held"] / b["dense"] == pytest.approx((sinks + band - 1) / seen)
    assert b["share"] < 0.15


def test_left_padded_batch_with_pruned_cache_equals_each_alone():
    model = _family("llama")
    mask = _mask(model)
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(3, V, (n,), generator=g) for n in (8, 5, 3)]
    ids, am = _left_padded(seqs)
    n = 12
    with torch.no_grad(), apply(model, mask):
        seq_b, log_b = _generate(model, ids, n, attention_mask=am, past_key_values=PrunedKVCache(model, mask))
        for i, s in enumerate(seqs):
            seq_1, log_1 = _generate(model, s[None], n, use_cache=False)
            assert torch.equal(seq_b[i, ids.shape[1]:], seq_1[0, len(s):])
            _close(log_b[i], log_1[0])


def test_beam_search_and_sampling_match_the_default_cache():
    model = _family("llama")
    mask = _mask(model)
    prompt = _prompt(batch=2)
    kw = dict(max_new_tokens=10, pad_token_id=0)
    with torch.no_grad(), apply(model, mask):
        beams = [model.generate(prompt, num_beams=3, num_return_sequences=2, do_sample=False, **kw,
                                **extra) for extra in ({"past_key_values": PrunedKVCache(model, mask)},
                                                       {"use_cache": False})]
        samples = []
        for extra in ({"past_key_values": PrunedKVCache(model, mask)}, {}):
            torch.manual_seed(7)
            samples.append(model.generate(prompt, do_sample=True, top_k=20, **kw, **extra))
    assert torch.equal(beams[0], beams[1])
    assert torch.equal(samples[0], samples[1])


def test_pruned_cache_length_and_usage_errors():
    model = _family("llama")
    mask = _mask(model)
    with torch.no_grad():
        with apply(model, mask):
            with pytest.raises(LengthError):
                _generate(model, _prompt(), CAL - PROMPT + 2, past_key_values=PrunedKVCache(model, mask))
        with apply(model, mask, beyond="dense"), pytest.raises(InvalidArgumentError, match="beyond='error'"):
            _generate(model, _prompt(), 4, past_key_values=PrunedKVCache(model, mask))
        with pytest.raises(InvalidArgumentError, match="not attached"):  # mask not attached
            _generate(model, _prompt(), 4, past_key_values=PrunedKVCache(model, mask))
        other = _family("gpt2")
        with pytest.raises(UnsupportedModelError, match="every attention layer"):
            PrunedKVCache(other, mask)  # a mask of another model: no site for its layers


def test_encoder_decoder_gets_an_encoder_decoder_cache():
    """Encoder-decoder models are supported since issue 13: tests/unit/test_cache_encdec.py."""
    import tiny_models as tm
    from transformers.cache_utils import EncoderDecoderCache

    from attnprune import make_mask, observe

    model = tm.bart()
    b = tm.batch([5, 3], seed=7)
    b["decoder_input_ids"] = torch.randint(3, tm.VOCAB, (2, 4))
    mask = make_mask(observe(model, [b], progress=False), 0.5)
    assert isinstance(PrunedKVCache(model, mask), EncoderDecoderCache)
