"""The interception mechanism: site discovery, names, kinds, replacement, restoration."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tiny_models as tm
from attnprune.capture import intercept, site_kind
from attnprune.errors import NoAttentionSitesError


def run(model, kwargs, handler=lambda c: None):
    calls = []

    def h(c):
        calls.append(c)
        return handler(c)

    with torch.no_grad(), intercept(model, h):
        out = model(**kwargs)
    return calls, out


def sites(calls):
    return [(c.site, c.kind, c.info.num_heads, c.info.num_kv_heads) for c in calls]


def test_hf_sites_names_kinds_and_heads():
    b = tm.batch([5, 3])
    assert sites(run(tm.bert(), b)[0]) == [(f"encoder.layer.{i}.attention.self", "self", 4, 4) for i in (0, 1)]
    assert sites(run(tm.gpt2(), b)[0]) == [(f"transformer.h.{i}.attn", "causal", 4, 4) for i in (0, 1)]
    assert sites(run(tm.llama(), b)[0]) == [(f"model.layers.{i}.self_attn", "causal", 4, 2) for i in (0, 1)]
    bb = dict(b, decoder_input_ids=b["input_ids"][:, :3])
    assert sites(run(tm.bart(), bb)[0]) == [("model.encoder.layers.0.self_attn", "self", 4, 4),
                                            ("model.decoder.layers.0.self_attn", "causal", 2, 2),
                                            ("model.decoder.layers.0.encoder_attn", "cross", 2, 2)]


class _HFPlusCustom(nn.Module):
    """A Hugging Face model followed by a hand-built SDPA layer (not reachable by the HF path)."""

    def __init__(self):
        super().__init__()
        self.hf = tm.llama()
        self.proj = nn.Linear(tm.VOCAB, 16)

    def forward(self, input_ids, attention_mask=None):
        x = self.proj(self.hf(input_ids=input_ids, attention_mask=attention_mask).logits)
        q = x.view(x.shape[0], x.shape[1], 2, 8).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q, is_causal=True)


def test_sdpa_mode_is_dropped_for_pure_hf_models_and_kept_for_mixed_ones():
    """The per-op SDPA mode is on only in the first forward of a pure HF model (it finds nothing
    there); a model that also calls SDPA outside the HF path keeps it, and its site stays visible."""
    b = tm.batch([5, 3])
    for model, extra_sites, needed in ((tm.llama(), [], False), (_HFPlusCustom(), [""], True)):
        seen = []
        with torch.no_grad(), intercept(model, lambda c: seen.append(c.site)) as it:
            for _ in range(3):
                seen.clear()
                model(**b)
                hf_sites = [s for s in seen if s.endswith("self_attn")]
                assert len(hf_sites) == 2 and [s for s in seen if s not in hf_sites] == extra_sites
                assert it.mode_needed is needed and not it.mode_on
                assert it.narrowed is not needed  # hooks kept on every module while the mode is needed


def test_generic_sites():
    ids = {"input_ids": torch.randint(0, tm.VOCAB, (2, 5))}
    calls, _ = run(tm.nanogpt(), ids)
    assert sites(calls) == [("blocks.0", "causal", 4, 4), ("blocks.1", "causal", 4, 4)]
    assert calls[0].is_causal and calls[0].q.shape == (2, 4, 5, 8)
    calls, _ = run(tm.mha(), tm.batch([5, 3]))
    assert sites(calls) == [("attn.0", "self", 4, 4), ("attn.1", "self", 4, 4)]


def test_torch_transformer_decoder_layer_kinds():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    tgt, mem = torch.randn(1, 4, 16), torch.randn(1, 6, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(4)
    calls = []
    with torch.no_grad(), intercept(layer, lambda c: calls.append(c)):
        layer(tgt, mem, tgt_mask=causal)
    assert sites(calls) == [("self_attn", "causal", 2, 2), ("multihead_attn", "cross", 2, 2)]


class Twice(nn.Module):
    def forward(self, x):
        a = F.scaled_dot_product_attention(x, x, x)
        return F.scaled_dot_product_attention(a, x, x[..., :2])  # 3-D inputs, Dv != D


def test_two_calls_in_one_module_and_three_dim_inputs():
    m = nn.Sequential(Twice())
    x = torch.randn(2, 5, 4)
    calls = []
    with intercept(m, lambda c: calls.append(c)):
        y = m(x)
        m(x)
    assert [c.site for c in calls] == ["0", "0#1", "0", "0#1"]
    assert calls[1].q.shape == (2, 1, 5, 4) and calls[1].v.shape == (2, 1, 5, 2)
    assert y.shape == (2, 5, 2)


def test_handler_output_replaces_the_computation():
    model = tm.nanogpt()
    ids = {"input_ids": torch.randint(0, tm.VOCAB, (1, 4))}
    _, ref = run(model, ids)
    _, same = run(model, ids, lambda c: F.scaled_dot_product_attention(c.q, c.k, c.v, is_causal=c.is_causal))
    _, zero = run(model, ids, lambda c: torch.zeros_like(c.q))
    torch.testing.assert_close(same, ref)
    assert not torch.allclose(zero, ref)
    for name in ("llama", "bert"):
        m = getattr(tm, name)()
        b = tm.batch([4, 2])
        _, a = run(m, b)
        _, z = run(m, b, lambda c: torch.zeros(*c.q.shape[:3], c.v.shape[-1]))
        assert not torch.allclose(a.logits if name == "llama" else a.last_hidden_state,
                                  z.logits if name == "llama" else z.last_hidden_state)


def test_everything_restored_after_errors():
    model = tm.gpt2()
    model.set_attn_implementation("eager")

    def boom(c):
        raise RuntimeError("handler failed")

    with pytest.raises(RuntimeError, match="handler failed"), intercept(model, boom):
        model(torch.zeros(1, 3, dtype=torch.long))
    assert model.config._attn_implementation == "eager"
    nano = tm.nanogpt()
    with pytest.raises(RuntimeError), intercept(nano, boom):
        nano(torch.zeros(1, 3, dtype=torch.long))
    seen = []
    with intercept(tm.nanogpt(), lambda c: seen.append(c)):
        nano(torch.zeros(1, 3, dtype=torch.long))  # another model: its calls are not this context's
    assert seen == [] and all(not m._forward_hooks for m in nano.modules())
    F.scaled_dot_product_attention(torch.randn(1, 1, 2, 2), torch.randn(1, 1, 2, 2), torch.randn(1, 1, 2, 2))


@pytest.mark.parametrize("cls", [tm.NoAttention, tm.ManualAttention])
def test_no_attention_sites(cls):
    with pytest.raises(NoAttentionSitesError, match="no attention site"), intercept(cls(), lambda c: None) as it:
        it.model(torch.zeros(1, 3, dtype=torch.long))


def test_site_kind_rules():
    assert site_kind("dec.layers.0.encoder_attn", None, None, True, 4, 4) == "cross"
    assert site_kind("x.crossattention.self", None, None, False, 4, 4) == "cross"
    assert site_kind("blocks.0.attn", None, None, True, 4, 4) == "causal"
    assert site_kind("blocks.0.attn", None, None, False, 4, 6) == "cross"
    assert site_kind("blocks.0.attn", None, None, False, 4, 4) == "self"
    m = nn.Module()
    m.is_cross_attention = True
    assert site_kind("a", m, None, True, 4, 4) == "cross"


def test_causal_detected_from_explicit_mask():
    class Masked(nn.Module):
        def forward(self, x):
            L = x.shape[-2]
            return F.scaled_dot_product_attention(x, x, x, attn_mask=torch.ones(L, L, dtype=torch.bool).tril())

    calls = []
    with intercept(nn.Sequential(Masked()), lambda c: calls.append(c)) as it:
        it.model(torch.randn(1, 2, 4, 8))
    assert calls[0].kind == "causal" and not calls[0].is_causal
