"""PrunedKVCache on encoder-decoder models (issue 13): an EncoderDecoderCache whose self-attention part
is pruned as for decoder-only models and whose cross-attention part holds a static subset of the
encoder's keys and values; generation gives the tokens and logits of masked recomputation without a
cache, and holds fewer bytes than the default cache when the mask prunes."""

import pytest
import torch
from transformers.cache_utils import EncoderDecoderCache

from attnprune import PrunedKVCache, apply, make_mask, observe
from attnprune.cache_encdec import PrunedCrossLayer, read_columns
from attnprune.errors import InvalidArgumentError, LengthError, UnsupportedModelError
from attnprune.mask import PruneMask, SiteMask
from lm_helpers import _close

V, ENC, DEC = 97, 12, 16  # vocabulary; calibrated encoder and decoder lengths


def _bart():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BartConfig(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, pad_token_id=1,
                        bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
                        init_std=0.3)
    return tf.BartForConditionalGeneration(cfg).eval()


def _calib(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, V, (2, ENC), generator=g),
             "decoder_input_ids": torch.randint(3, V, (2, DEC), generator=g)} for _ in range(2)]


def _mask(model, sparsity=0.7):
    return make_mask(observe(model, _calib(), progress=False), sparsity)


def _encoder_batch(left=False):
    """Three encoder sequences of 12, 8 and 5 tokens, padded (pad id 1) on the right or left."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, V, (3, ENC), generator=g)
    am = torch.ones_like(ids)
    for i, n in enumerate((ENC, 8, 5)):
        if left:
            am[i, :ENC - n] = 0
        else:
            am[i, n:] = 0
    return ids.masked_fill(am == 0, 1), am


def _generate(model, ids, am, n, **kw):
    out = model.generate(ids, attention_mask=am, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.logits, 1)


def _cross_band_mask(model, cols=4):
    """The observed mask with each cross site reading only encoder positions ``< cols``, plus one
    column per kv head that only the last calibrated row reads (kept: a later row may read it)."""
    mask = _mask(model)
    sms = []
    for s in mask.sites:
        sm = mask.site(s)
        if sm.info.kind == "cross":
            keep = torch.zeros_like(sm.keep)
            keep[:, :, :cols] = True
            keep[:, -1, ENC - 1] = True  # read by the last calibrated row only
            sm = SiteMask(sm.info, sm.q_len, sm.k_len, keep=keep)
        sms.append(sm)
    return PruneMask(sms, mask.meta)


@pytest.mark.parametrize("left", [False, True])
def test_bart_generate_with_pruned_cache_equals_full_recomputation(left, monkeypatch):
    model = _bart()
    mask = _mask(model)
    ids, am = _encoder_batch(left)
    calls = []
    attend = PrunedCrossLayer.attend
    monkeypatch.setattr(PrunedCrossLayer, "attend", lambda self, *a: calls.append(1) or attend(self, *a))
    with torch.no_grad(), apply(model, mask):
        cache = PrunedKVCache(model, mask)
        assert isinstance(cache, EncoderDecoderCache)
        seq_p, log_p = _generate(model, ids, am, DEC - 1, past_key_values=cache)
        seq_n, log_n = _generate(model, ids, am, DEC - 1, use_cache=False)
    assert torch.equal(seq_p, seq_n)
    _close(log_p, log_n)
    assert len(calls) == 2 * (DEC - 2)  # every decoder forward after the first, both layers
    b = cache.kv_bytes()
    for part in ("self", "cross"):
        assert 0 < b[part]["held"] < b[part]["dense"]
    assert b["held"] == b["self"]["held"] + b["cross"]["held"] and b["share"] < 1


def test_cross_part_holds_only_the_columns_some_row_reads():
    """Cross sites reading 4 encoder columns + one column read by the last calibrated row only: the
    cross part holds exactly those 5 per head (the last-row column too), the tokens stay exact."""
    model = _bart()
    mask = _cross_band_mask(model)
    ids, am = _encoder_batch()
    with torch.no_grad(), apply(model, mask):
        cache = PrunedKVCache(model, mask)
        seq_p, log_p = _generate(model, ids, am, DEC, past_key_values=cache)  # rows up to the last one
        seq_n, log_n = _generate(model, ids, am, DEC, use_cache=False)
    assert torch.equal(seq_p, seq_n)
    _close(log_p, log_n)
    cross = cache.kv_bytes()["cross"]
    assert cross["held"] / cross["dense"] == pytest.approx(5 / ENC)
    for layer in cache.cross_attention_cache.layers:
        pos = layer.pos[0]  # the unpadded sequence
        assert pos.shape[-1] == 5 and (pos == torch.tensor([0, 1, 2, 3, ENC - 1])).all()
        assert (layer.pos[2] == torch.tensor([0, 1, 2, 3, -1])).all()  # 5 tokens: its last is padding


def test_read_columns_groups_heads_and_blocks():
    from attnprune.sites import SiteInfo

    keep = torch.zeros(4, 3, 5, dtype=torch.bool)
    keep[0, 2, 1] = keep[3, 0, 4] = True
    sm = SiteMask(SiteInfo("x", "cross", 4, 2), 3, 5, keep=keep)
    assert read_columns(sm, 2).tolist() == [[False, True, False, False, False], [False] * 4 + [True]]
    blocks = torch.zeros(2, 2, 3, dtype=torch.bool)
    blocks[1, 1, 2] = True
    sb = SiteMask(SiteInfo("y", "cross", 2, 2), 4, 5, keep=blocks, block=2)
    assert read_columns(sb, 2).tolist() == [[False] * 5, [False] * 4 + [True]]


def test_beam_search_with_pruned_encoder_decoder_cache():
    model = _bart()
    mask = _mask(model)
    ids, am = _encoder_batch()
    kw = dict(attention_mask=am, max_new_tokens=10, min_new_tokens=10, num_beams=3, num_return_sequences=2,
              do_sample=False)
    with torch.no_grad(), apply(model, mask):
        got = model.generate(ids, past_key_values=PrunedKVCache(model, mask), **kw)
        want = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(got, want)


def test_past_the_calibrated_decoder_length():
    """Decoder rows past the calibration raise LengthError under error and under extend (the cross
    site has no length-free form), as recomputation without a cache does."""
    model = _bart()
    mask = _mask(model)
    ids, am = _encoder_batch()
    with torch.no_grad():
        for beyond, match in (("error", "calibrated"), ("extend", "cross-attention")):
            with apply(model, mask, beyond=beyond):
                with pytest.raises(LengthError, match=match):
                    _generate(model, ids, am, DEC + 2, past_key_values=PrunedKVCache(model, mask))
                with pytest.raises(LengthError):
                    _generate(model, ids, am, DEC + 2, use_cache=False)
        with apply(model, mask, beyond="dense"), pytest.raises(InvalidArgumentError, match="beyond='error'"):
            _generate(model, ids, am, 4, past_key_values=PrunedKVCache(model, mask))


def test_t5_relative_position_bias_is_refused_clearly():
    import tiny_models as tm

    model = tm.t5()
    b = tm.batch([5, 3], seed=7)
    b["decoder_input_ids"] = torch.randint(3, tm.VOCAB, (2, 4))
    mask = make_mask(observe(model, [b], progress=False), 0.5)
    with pytest.raises(UnsupportedModelError, match="relative position bias.*default cache"):
        PrunedKVCache(model, mask)


def test_a_mask_without_cross_sites_is_refused():
    model = _bart()
    mask = _mask(model)
    causal_only = PruneMask([mask.site(s) for s in mask.sites if mask.site(s).info.kind != "cross"], mask.meta)
    with pytest.raises(UnsupportedModelError, match="cross-attention mask site"):
        PrunedKVCache(model, causal_only)
