"""Hook scope (issue 9): once the first forward of a Hugging Face model finds the SDPA mode unneeded,
the per-module hooks stay only where they can change something, and nothing observable changes.

The reference for "nothing changes" is the same run with ``Interceptor._narrow`` disabled (hooks on
every module, as before issue 9): site names, kinds, positions and outputs must be identical."""

import pytest
import torch
import torch.nn.functional as F

import tiny_models as tm
import attnprune
from attnprune.capture import Interceptor, intercept


def _t(x):
    return None if x is None else x.tolist()


def _record(c):
    p = c.positions
    return (c.site, c.kind, c.is_causal, tuple(c.q.shape), tuple(c.k.shape), p.q_offset, _t(p.q), _t(p.k),
            p.q_end, p.k_end, _t(p.q_valid), c.window)


def _handler(log):
    """Records every call and computes attention itself (halved), so outputs depend on the capture."""
    def h(c):
        log.append(_record(c))
        out = F.scaled_dot_product_attention(c.q, c.k, c.v, attn_mask=c.attn_mask, is_causal=c.is_causal,
                                             scale=c.scale, enable_gqa=c.q.shape[1] != c.k.shape[1])
        return 0.5 * out
    return h


def _hooked(model):
    """Names of the modules carrying the interceptor's forward pre-hook."""
    names = {m: n for n, m in model.named_modules()}
    return {names[m] for m in model.modules()
            if any(isinstance(getattr(h, "__self__", None), Interceptor) for h in m._forward_pre_hooks.values())}


def _both(monkeypatch, scenario):
    """``scenario()``'s (log, outputs) with the hook scope narrowed and with hooks on every module."""
    got = scenario()
    with monkeypatch.context() as mp:
        mp.setattr(Interceptor, "_narrow", lambda self: None)
        ref = scenario()
    return got, ref


def _assert_same(got, ref):
    (log, outs), (ref_log, ref_outs) = got, ref
    assert log == ref_log
    assert len(outs) == len(ref_outs)
    for a, b in zip(outs, ref_outs):
        assert torch.equal(a, b)


def test_after_the_first_forward_only_owners_their_ancestors_and_unentered_modules_keep_hooks():
    model = tm.llama()
    b = tm.batch([5, 3])
    with torch.no_grad(), intercept(model, lambda c: None) as it:
        assert len(_hooked(model)) == len(list(model.modules())) == 33
        model(**b)
        kept = {"", "model", "model.layers", "model.layers.0", "model.layers.0.self_attn", "model.layers.1",
                "model.layers.1.self_attn"}  # model.layers (a ModuleList) is never entered
        assert it.narrowed and _hooked(model) == kept
        assert {n for n, m in model.named_modules() if m._forward_hooks} == kept
        assert len(model._forward_pre_hooks) == 2  # its own and the root hook
        n = [0]
        for m in model.modules():
            for d in (m._forward_pre_hooks, m._forward_hooks):
                for k, h in list(d.items()):
                    d[k] = lambda *a, _h=h, **kw: (n.__setitem__(0, n[0] + 1), _h(*a, **kw))[1]
        model(**b)
        assert n[0] == 2 * 6 + 2  # 6 hooked modules entered (pre + post) and the two root hooks
    assert not _hooked(model) and not any(m._forward_hooks for m in model.modules())


def test_models_that_need_the_sdpa_mode_keep_every_hook():
    from test_capture import _HFPlusCustom

    for model, kw in ((tm.nanogpt(), {"input_ids": torch.zeros(1, 4, dtype=torch.long)}),
                      (_HFPlusCustom(), tm.batch([5, 3]))):
        with torch.no_grad(), intercept(model, lambda c: None) as it:
            for _ in range(2):
                model(**kw)
            assert not it.narrowed and len(_hooked(model)) == len(list(model.modules()))


def test_repeated_forwards_names_positions_outputs_unchanged(monkeypatch):
    def scenario():
        model, log, outs = tm.llama(), [], []
        with torch.no_grad(), intercept(model, _handler(log)):
            for lengths in ([5, 3], [5, 3], [4, 4, 2], [6]):
                outs.append(model(**tm.batch(lengths)).logits)
        return log, outs

    got, ref = _both(monkeypatch, scenario)
    _assert_same(got, ref)
    assert [r[0] for r in got[0][:2]] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]


def test_generation_with_a_cache_unchanged(monkeypatch):
    def scenario():
        model, log, outs = tm.llama(), [], []
        b = tm.batch([5, 3])
        b["input_ids"], b["attention_mask"] = b["input_ids"].flip(1), b["attention_mask"].flip(1)  # left padded
        with torch.no_grad(), intercept(model, _handler(log)):
            for _ in range(2):
                outs.append(model.generate(**b, max_new_tokens=4, do_sample=False, pad_token_id=1))
        return log, outs

    got, ref = _both(monkeypatch, scenario)
    _assert_same(got, ref)
    assert len(got[0]) == 2 * 4 * 2  # 2 generate calls x 4 steps x 2 layers


def test_t5_direct_encoder_call_and_generate_unchanged(monkeypatch):
    def scenario():
        model, log, outs = tm.t5(), [], []
        b = tm.batch([5, 3])
        with torch.no_grad(), intercept(model, _handler(log)):
            outs.append(model(**b, decoder_input_ids=b["input_ids"][:, :3]).logits)
            for _ in range(2):
                outs.append(model.get_encoder()(**b).last_hidden_state)
            outs.append(model.generate(**b, max_new_tokens=3, do_sample=False))
        return log, outs

    got, ref = _both(monkeypatch, scenario)
    _assert_same(got, ref)
    enc = [r for r in got[0] if r[0].startswith("encoder.")]
    assert [r[0] for r in enc[:2]] == ["encoder.block.0.layer.0.SelfAttention"] * 2
    assert enc[1][9] == 5  # the direct call's own padding mask: its keys end at 5


def test_bart_first_forward_without_the_encoder_keeps_the_encoder_hooked(monkeypatch):
    def scenario():
        model, log, outs = tm.bart(), [], []
        b = tm.batch([5, 3])
        with torch.no_grad():
            enc = model.get_encoder()(**b)
        with torch.no_grad(), intercept(model, _handler(log)) as it:
            outs.append(model(**b, encoder_outputs=enc, decoder_input_ids=b["input_ids"][:, :3]).logits)
            if it.narrowed:
                hooked = _hooked(model)
                assert {n for n, _ in model.model.encoder.named_modules(prefix="model.encoder")} <= hooked
                assert "model.decoder.layers.0.fc1" not in hooked
            outs.append(model.get_encoder()(**b).last_hidden_state)
            outs.append(model(**b, decoder_input_ids=b["input_ids"][:, :3]).logits)
        return log, outs

    got, ref = _both(monkeypatch, scenario)
    _assert_same(got, ref)
    assert "model.encoder.layers.0.self_attn" in [r[0] for r in got[0]]


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_unchanged(monkeypatch, reentrant):
    def scenario():
        model, log, outs = tm.llama(), [], []
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        b = tm.batch([5, 3])
        with intercept(model, _handler(log)):
            for _ in range(2):
                model.zero_grad()
                out = model(**b, labels=b["input_ids"], use_cache=False)
                out.loss.backward()
                outs += [out.logits.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]
        return log, outs

    got, ref = _both(monkeypatch, scenario)
    _assert_same(got, ref)
    assert len(got[0]) == 2 * 2 * 2  # 2 steps x (forward + recomputation) x 2 layers


def test_a_module_entered_with_forward_inputs_keeps_its_hooks(monkeypatch):
    """Called directly with ``input_ids``, BERT's embeddings start a context (as any module does) that a
    later attention module called on its own (no forward inputs, so no context of its own) uses."""
    def scenario():
        model, log, outs = tm.bert(), [], []
        b = tm.batch([5, 3])
        with torch.no_grad(), intercept(model, _handler(log)):
            outs.append(model(**b).last_hidden_state)
            x = model.embeddings(input_ids=b["input_ids"][:, :4])
            outs.append(model.encoder.layer[0].attention.self(x)[0])
        return log, outs

    got, ref = _both(monkeypatch, scenario)
    _assert_same(got, ref)
    assert got[0][-1][0] == "encoder.layer.0.attention.self" and got[0][-1][8] is None  # no padding mask


class _Later(torch.nn.Module):
    """Wraps an attention module, calls it positionally (no forward-input keyword), and makes it
    skip the attention function in its first call (eager attention, not intercepted)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.first = inner, True

    def forward(self, hidden_states, position_embeddings, attention_mask, **kw):
        cfg = self.inner.config
        saved = cfg._attn_implementation_internal
        if self.first:
            self.first, cfg._attn_implementation_internal = False, "eager"
        try:
            return self.inner(hidden_states, position_embeddings, attention_mask)
        finally:
            cfg._attn_implementation_internal = saved


def test_a_module_calling_attention_only_later_gets_its_hooks_back():
    model = tm.llama()
    layer = model.model.layers[1]
    layer.self_attn = _Later(layer.self_attn)
    seen = []
    site = "model.layers.1.self_attn.inner"
    b = dict(tm.batch([5, 3]), use_cache=False)
    with torch.no_grad(), intercept(model, lambda c: seen.append(c.site)):
        model(**b)
        assert seen == ["model.layers.0.self_attn"]
        assert "model.layers.1.self_attn" in _hooked(model) and site not in _hooked(model)
        for _ in range(3):  # without its hooks back, the count of its calls would not be reset: "inner#1"
            seen.clear()
            model(**b)
            assert seen == ["model.layers.0.self_attn", site]
        assert site in _hooked(model)


def test_attach_detach_reattach(monkeypatch):
    def scenario():
        model = tm.llama()
        b = tm.batch([5, 3])
        with torch.no_grad():
            dense = model(**b).logits
        infos = {}
        with torch.no_grad(), intercept(model, lambda c: infos.setdefault(c.site, c.info) and None):
            model(**b)
        from attnprune.bench.model import synthetic_mask

        mask = synthetic_mask(infos, 8, 0.0, 4)  # keeps every attendable block
        outs, counts = [dense], []
        with torch.no_grad():
            for _ in range(2):
                attnprune.attach(model, mask, backend="reference")
                counts.append(len(_hooked(model)))
                outs += [model(**b).logits for _ in range(2)]
                counts.append(len(_hooked(model)))
                attnprune.detach(model)
                counts.append(len(_hooked(model)) + sum(len(m._forward_hooks) for m in model.modules()))
        return counts, outs

    (counts, outs), (ref_counts, ref_outs) = _both(monkeypatch, scenario)
    assert counts == [33, 7, 0] * 2 and ref_counts == [33, 33, 0] * 2
    for a, b in zip(outs, ref_outs):
        assert torch.equal(a, b)
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0])
