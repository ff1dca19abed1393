"""apply / attach / detach and the reference backend against hand-built masked softmax attention."""

import pytest
import torch
import torch.nn.functional as F

import tiny_models as tm
from attnprune.apply import apply, attach, attached, detach
from attnprune.backends import BACKENDS
from attnprune.backends.reference import reference_backend
from attnprune.capture import intercept
from attnprune.errors import (InvalidArgumentError, LengthError, MaskMismatchError, NoAttentionSitesError)
from attnprune.mask import PruneMask, SiteMask
from attnprune.sites import SiteInfo


def model_infos(model, batch):
    infos = {}
    with torch.no_grad(), intercept(model, lambda c: infos.setdefault(c.site, c.info) and None):
        model(**batch)
    return infos


def build_mask(infos, L, density=None, seed=0, lens=None):
    """Random keep masks (every row keeps key 0, so causal rows are never empty); density None: all True."""
    g = torch.Generator().manual_seed(seed)
    sms = []
    for name, info in infos.items():
        lq, lk = (lens or {}).get(name, (L, L))
        if density is None:
            keep = torch.ones(info.num_heads, lq, lk, dtype=torch.bool)
        else:
            keep = torch.rand(info.num_heads, lq, lk, generator=g) < density
            keep[:, :, 0] = True
        sms.append(SiteMask(info, lq, lk, keep=keep))
    return PruneMask(sms, {"model": {"name": "tiny"}})


def out_of(o):
    for attr in ("logits", "last_hidden_state"):
        if hasattr(o, attr):
            return getattr(o, attr)
    return o


def inputs(name, lens=(6, 4), total=6, seed=0):
    b = tm.batch(list(lens), total, seed=seed)
    if name == "nanogpt":
        return {"input_ids": b["input_ids"]}
    if name in ("bart", "t5"):
        d = tm.batch([n - 1 for n in lens], total - 1, seed=seed + 1)
        b["decoder_input_ids"], b["decoder_attention_mask"] = d["input_ids"], d["attention_mask"]
    return b


# ---- hand-built references -------------------------------------------------------------------

def _hand_masked(q, k, v, allow, scale):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    p = torch.softmax(s.masked_fill(~allow, float("-inf")), -1)
    return torch.nan_to_num(p) @ v


class HandHF:
    """A transformers attention function computing keep-masked softmax by hand, as an independent reference."""

    def __init__(self, model, mask):
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        self.names = {m: n for n, m in model.named_modules()}
        self.mask, self.model = mask, model
        AttentionInterface.register("hand_test", self.fn)
        AttentionMaskInterface.register("hand_test", sdpa_mask)

    def fn(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
        lq, lk = query.shape[2], key.shape[2]
        keep = self.mask[self.names[module]]
        causal = getattr(module, "is_causal", False)
        off = lk - lq if causal else 0
        allow = keep[:, off:off + lq, :lk][None]
        if attention_mask is not None:
            allow = allow & attention_mask
        elif causal and lq > 1:
            allow = allow & torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
        return _hand_masked(query, key, value, allow, scaling).transpose(1, 2), None

    def __enter__(self):
        self.model.set_attn_implementation("hand_test")
        return self

    def __exit__(self, *exc):
        self.model.set_attn_implementation("sdpa")


def nano_hand(model, ids, mask):
    x = model.wte(ids) + model.wpe(torch.arange(ids.shape[1]))
    L = ids.shape[1]
    for i, blk in enumerate(model.blocks):
        q, k, v = blk.qkv_heads(x)
        allow = mask[f"blocks.{i}"][:, :L, :L] & torch.ones(L, L, dtype=torch.bool).tril()
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allow)
        x = x + blk.proj(y.transpose(1, 2).reshape(x.shape))
    return model.head(x)


def mha_hand(model, ids, am, mask):
    x = model.emb(ids)
    B, L = ids.shape
    for i, a in enumerate(model.attn):
        block = ~mask[f"attn.{i}"][:, :L, :L].repeat(B, 1, 1)  # [B*H, L, L], True = not allowed
        y, _ = a(x, x, x, key_padding_mask=~am.bool(), attn_mask=block, need_weights=False)
        x = x + y
    return x


# ---- tests -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "bart", "t5", "nanogpt", "mha"])
def test_all_true_mask_leaves_outputs_unchanged(name):
    model = getattr(tm, name)()
    b = inputs(name)
    mask = build_mask(model_infos(model, b), 8)
    with torch.no_grad():
        ref = out_of(model(**b))
        with apply(model, mask):
            got = out_of(model(**b))
        again = out_of(model(**b))
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=1e-5)
    assert torch.equal(again, ref)


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "bart"])
def test_pruned_mask_equals_hand_built_masked_softmax_hf(name):
    model = getattr(tm, name)()
    b = inputs(name)
    mask = build_mask(model_infos(model, b), 8, density=0.5, seed=1)
    with torch.no_grad():
        dense = out_of(model(**b))
        with apply(model, mask):
            got = out_of(model(**b))
        with HandHF(model, mask):
            want = out_of(model(**b))
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    assert (got - dense).abs().max() > 1e-3  # the mask did something


def test_pruned_mask_nanogpt_values_and_gradients():
    model = tm.nanogpt().train()
    ids = torch.randint(0, tm.VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = build_mask(model_infos(model, {"input_ids": ids}), 9, density=0.3, seed=2)
    with apply(model, mask):
        got = model(ids)
    got.square().mean().backward()
    g_got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    want = nano_hand(model, ids, mask)
    want.square().mean().backward()
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(g_got[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)
    assert g_got["blocks.0.qkv.weight"].abs().sum() > 0


def test_pruned_mask_multihead_attention():
    model = tm.mha()
    b = inputs("mha")
    mask = build_mask(model_infos(model, b), 6, density=0.4, seed=3)
    with torch.no_grad():
        with apply(model, mask):
            got = model(**b)
        want = mha_hand(model, b["input_ids"], b["attention_mask"], mask)
    real = b["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=2e-6, rtol=1e-5)


def test_llama_gradients_match_hand_built():
    model = tm.llama().train()
    b = inputs("llama")
    mask = build_mask(model_infos(model, b), 6, density=0.5, seed=4)
    grads = []
    for ctx in (lambda: apply(model, mask), lambda: HandHF(model, mask)):
        model.zero_grad()
        with ctx():
            model(**b, labels=b["input_ids"]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-4, msg=n)


def test_kv_cache_decoding_uses_offset_rows():
    model = tm.llama()
    ids = torch.randint(3, tm.VOCAB, (1, 7), generator=torch.Generator().manual_seed(5))
    mask = build_mask(model_infos(model, {"input_ids": ids}), 7, density=0.5, seed=5)
    with torch.no_grad(), apply(model, mask):
        full = model(ids).logits
        pre = model(ids[:, :5], use_cache=True)
        step = model(ids[:, 5:6], past_key_values=pre.past_key_values, use_cache=True)  # both transformers 5.17 and 5.24 take this name
    torch.testing.assert_close(step.logits[:, -1], full[:, 5], atol=2e-6, rtol=1e-5)


def test_encoder_decoder_incremental_decoding_with_cross_attention():
    model = tm.bart()
    b = tm.batch([5, 3], seed=7)
    dec = torch.randint(3, tm.VOCAB, (2, 4), generator=torch.Generator().manual_seed(7))
    mask = build_mask(model_infos(model, dict(b, decoder_input_ids=dec)), 5, density=0.5, seed=7,
                      lens={"model.decoder.layers.0.self_attn": (4, 4), "model.decoder.layers.0.encoder_attn": (4, 5)})
    with torch.no_grad(), apply(model, mask):
        full = model(**b, decoder_input_ids=dec).logits
        enc = model.get_encoder()(**b)
        pre = model(encoder_outputs=enc, attention_mask=b["attention_mask"], decoder_input_ids=dec[:, :3],
                    use_cache=True)
        step = model(encoder_outputs=enc, attention_mask=b["attention_mask"], decoder_input_ids=dec[:, 3:],
                     past_key_values=pre.past_key_values, use_cache=True)  # both transformers 5.17 and 5.24 take this name
    torch.testing.assert_close(step.logits[:, -1], full[:, 3], atol=2e-6, rtol=1e-5)


def test_shorter_inputs_use_top_left_and_longer_need_dense():
    model = tm.nanogpt()
    mask = build_mask(model_infos(model, {"input_ids": torch.zeros(1, 6, dtype=torch.long)}), 6,
                      density=0.5, seed=6)
    short = torch.randint(0, tm.VOCAB, (1, 4))
    with torch.no_grad(), apply(model, mask):
        got = model(short)
    torch.testing.assert_close(got, nano_hand(model, short, mask), atol=2e-6, rtol=1e-5)
    long = torch.randint(0, tm.VOCAB, (1, 9))
    with pytest.raises(LengthError, match="blocks.0"), torch.no_grad(), apply(model, mask):
        model(long)
    padded = {}
    for s in mask.sites:
        keep = torch.ones(4, 9, 9, dtype=torch.bool)
        keep[:, :6, :6] = mask[s]
        padded[s] = keep
    with torch.no_grad(), apply(model, mask, beyond="dense"):
        got = model(long)
    torch.testing.assert_close(got, nano_hand(model, long, padded), atol=2e-6, rtol=1e-5)


def test_attach_detach_permanent_and_restores_config():
    model = tm.gpt2()
    b = inputs("gpt2")
    mask = build_mask(model_infos(model, b), 6, density=0.3)
    with torch.no_grad():
        dense = model(**b).logits
        assert attach(model, mask) is model and attached(model) is mask
        assert model.config._attn_implementation == "attnprune"
        p1, p2 = model(**b).logits, model(**b).logits
        with pytest.raises(InvalidArgumentError):
            attach(model, mask)
        detach(model)
        assert model.config._attn_implementation == "sdpa" and attached(model) is None
        back = model(**b).logits
    assert torch.equal(p1, p2) and not torch.allclose(p1, dense) and torch.equal(back, dense)
    with pytest.raises(InvalidArgumentError):
        detach(model)


def test_mask_for_another_model():
    gpt2, llama = tm.gpt2(), tm.llama()
    b = inputs("gpt2")
    mask = build_mask(model_infos(gpt2, b), 6)
    with pytest.raises(MaskMismatchError, match="model.layers.0.self_attn"), apply(llama, mask):
        llama(**b)
    assert llama.config._attn_implementation == "sdpa"  # restored after the error


def test_head_count_mismatch():
    model = tm.bert()
    b = inputs("bert")
    infos = model_infos(model, b)
    wrong = {n: SiteInfo(n, i.kind, 2, 2) for n, i in infos.items()}
    with pytest.raises(MaskMismatchError, match="heads"), apply(model, build_mask(wrong, 6)):
        model(**b)


def test_missing_and_extra_sites():
    model = tm.nanogpt()
    b = {"input_ids": torch.zeros(1, 4, dtype=torch.long)}
    infos = model_infos(model, b)
    only_one = build_mask({"blocks.0": infos["blocks.0"]}, 4)
    with pytest.raises(MaskMismatchError, match="blocks.1"), apply(model, only_one):
        model(**b)
    extra = dict(infos, **{"blocks.9": SiteInfo("blocks.9", "causal", 4, 4)})
    with pytest.raises(MaskMismatchError, match="blocks.9"), apply(model, build_mask(extra, 4)):
        model(**b)


def test_bad_arguments_and_no_sites():
    model = tm.nanogpt()
    mask = build_mask(model_infos(model, {"input_ids": torch.zeros(1, 4, dtype=torch.long)}), 4)
    with pytest.raises(InvalidArgumentError):
        attach(model, mask, beyond="sometimes")
    with pytest.raises(InvalidArgumentError, match="backend"):
        attach(model, mask, backend="nope")
    with pytest.raises(InvalidArgumentError):
        attach(model, {"blocks.0": torch.ones(1)})
    with pytest.raises(NoAttentionSitesError), apply(tm.NoAttention(), mask) as m:
        m(torch.zeros(1, 3, dtype=torch.long))


# ---- reference backend -----------------------------------------------------------------------

def _site(h, lq, lk, keep=None, kind="self", hkv=None):
    keep = torch.ones(h, lq, lk, dtype=torch.bool) if keep is None else keep
    return SiteMask(SiteInfo("s", kind, h, hkv or h), lq, lk, keep=keep)


def test_reference_is_registered():
    assert BACKENDS.get("reference") is reference_backend
    assert {"reference", "triton", "flex"} <= set(BACKENDS.names())


def test_reference_matches_sdpa_with_gqa_masks_and_scale():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g),
               torch.randn(2, 2, 7, 3, generator=g))
    additive = torch.randn(2, 1, 5, 7, generator=g)
    got = reference_backend(q, k, v, _site(4, 5, 7, hkv=2), attn_mask=additive, scale=0.3)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=additive, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    got = reference_backend(q, k, v, _site(4, 7, 7, hkv=2), is_causal=True, q_offset=2)
    allow = torch.ones(5, 7, dtype=torch.bool).tril(2)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=allow, enable_gqa=True)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_reference_pruned_entries_are_minus_infinity_and_renormalised():
    q = torch.zeros(1, 1, 2, 4)
    k = torch.zeros(1, 1, 3, 4)
    v = torch.tensor([[[[1.0], [2.0], [4.0]]]])
    keep = torch.tensor([[[True, False, True], [False, True, False]]])
    out = reference_backend(q, k, v, _site(1, 2, 3, keep))
    torch.testing.assert_close(out, torch.tensor([[[[2.5], [2.0]]]]))


def test_reference_empty_rows_are_zero_without_nan_gradients():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 3, 4, generator=g, requires_grad=True) for _ in range(3))
    keep = torch.ones(2, 3, 3, dtype=torch.bool)
    keep[0, 1] = False
    pad = torch.tensor([True, True, False])
    out = reference_backend(q, k, v, _site(2, 3, 3, keep), attn_mask=pad)
    assert torch.equal(out[0, 0, 1], torch.zeros(4))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[0, 0, 1], torch.zeros(4))


def test_reference_half_precision_and_length_rules():
    q = torch.randn(1, 2, 3, 8, dtype=torch.bfloat16)
    out = reference_backend(q, q, q, _site(2, 4, 4))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    with pytest.raises(LengthError):
        reference_backend(q, q, q, _site(2, 2, 2))
    with pytest.raises(MaskMismatchError):
        reference_backend(q, q, q, _site(3, 4, 4))
    torch.testing.assert_close(reference_backend(q, q, q, _site(2, 2, 2), beyond="dense").float(),
                               F.scaled_dot_product_attention(q, q, q).float(), atol=1e-2, rtol=1e-2)


class CheckpointedNano(tm.NanoGPT):
    def forward(self, input_ids):
        from torch.utils.checkpoint import checkpoint

        x = self.wte(input_ids) + self.wpe(torch.arange(input_ids.shape[1]))
        for b in self.blocks:
            x = checkpoint(b, x, use_reentrant=False)
        return self.head(x)


def test_activation_checkpointing_recomputes_with_the_mask():
    torch.manual_seed(0)
    model = CheckpointedNano().train()
    ids = torch.randint(0, tm.VOCAB, (2, 6), generator=torch.Generator().manual_seed(8))
    mask = build_mask(model_infos(model, {"input_ids": ids}), 6, density=0.3, seed=8)
    with apply(model, mask):
        model(ids).square().mean().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    nano_hand(model, ids, mask).square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)


def test_observe_or_apply_twice_on_one_model_is_refused():
    from attnprune.observe import observe

    model = tm.nanogpt()
    mask = build_mask(model_infos(model, {"input_ids": torch.zeros(1, 4, dtype=torch.long)}), 4)
    with apply(model, mask):
        with pytest.raises(InvalidArgumentError, match="already intercepted"):
            observe(model, [torch.zeros(1, 4, dtype=torch.long)], progress=False)
        with pytest.raises(InvalidArgumentError, match="already intercepted"):
            attach(model.blocks[0], mask)
    observe(model, [torch.zeros(1, 4, dtype=torch.long)], progress=False)  # free again


def test_padding_past_the_calibrated_length_is_not_an_error():
    model = tm.llama()
    calib = tm.batch([6, 4], 6, seed=9)
    from attnprune.observe import observe
    from attnprune.policies import make_mask

    mask = make_mask(observe(model, [calib], progress=False), 0.5)
    assert mask.site("model.layers.0.self_attn").q_len == 6
    wide = {k: torch.nn.functional.pad(v, (0, 3)) for k, v in calib.items()}  # padded to 9
    with torch.no_grad(), apply(model, mask):
        a = model(**calib).logits
        b = model(**wide).logits
        with pytest.raises(LengthError):
            model(**tm.batch([7, 4], 9, seed=9))  # a real 7th token is beyond the calibration
    real = calib["attention_mask"].bool()
    torch.testing.assert_close(b[:, :6][real], a[real], atol=2e-6, rtol=1e-5)


def test_padded_decoder_batch_applies_on_the_batch_it_was_observed_on():
    # the decoder is padded past its longest real target: observation calibrates the shorter length,
    # and cross-attention queries past it are only padding, so beyond="error" must not raise
    from attnprune import make_mask, observe

    model = tm.bart()
    b = inputs("bart", lens=(6, 4), total=8)
    stats = observe(model, [b], progress=False)
    dec = "model.decoder.layers.0.encoder_attn"
    assert stats.q_len(dec) < b["decoder_input_ids"].shape[1]
    mask = make_mask(stats, 0.5)
    with torch.no_grad():
        with apply(model, mask):
            got = model(**b).logits
        with apply(model, mask, beyond="dense"):
            want = model(**b).logits
    real = b["decoder_attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real])
    # a real decoder query past the calibrated length still raises
    longer = dict(b, decoder_attention_mask=torch.ones_like(b["decoder_attention_mask"]))
    with pytest.raises(LengthError), torch.no_grad(), apply(model, mask):
        model(**longer)


def test_auto_backend_resolves_on_the_models_device(monkeypatch):
    """``backend="auto"`` (the default) picks by the model's device: reference on the CPU, and what
    ``resolve_backend`` names for the model's device (patched here: no GPU needed)."""
    import sys

    import attnprune

    ap = sys.modules["attnprune.apply"]  # the module (attnprune.apply is the function)

    model = tm.llama()
    ids = torch.randint(3, tm.VOCAB, (1, 7), generator=torch.Generator().manual_seed(5))
    mask = build_mask(model_infos(model, {"input_ids": ids}), 7, density=0.5, seed=5)
    with apply(model, mask):
        assert attnprune.attached_backend(model) == "reference"
    seen = []
    monkeypatch.setattr(ap, "resolve_backend", lambda name, device: seen.append((name, device)) or "triton")
    with apply(model, mask, backend="auto"):
        assert attnprune.attached_backend(model) == "triton"
    assert seen == [("auto", torch.device("cpu"))]
    with apply(model, mask, backend="reference"):
        assert attnprune.attached_backend(model) == "reference"
    assert len(seen) == 1  # a named backend is not resolved
    assert attnprune.attached_backend(model) is None


def test_reference_reads_finfo_min_in_additive_masks_as_masked():
    """transformers' float masks hide entries with ``finfo.min``, not ``-inf``: the reference backend counts
    entries at or below half of it as masked, as the capture path and the kernels do, so a row they hide
    entirely is 0 (SDPA would average its values), the other rows equal the boolean mask's result, and a
    real (finite) bias elsewhere is still added."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 4, 8, generator=g) for _ in range(3))
    allow = torch.ones(4, 4, dtype=torch.bool).tril()
    allow[2] = False  # query 2 may see nothing
    bias = torch.randn(4, 4, generator=g)
    additive = torch.where(allow, bias, torch.finfo(torch.float32).min)[None, None]
    got = reference_backend(q, k, v, _site(2, 4, 4), attn_mask=additive)
    assert torch.equal(got[:, :, 2], torch.zeros(1, 2, 8))
    rows = [0, 1, 3]
    want = F.scaled_dot_product_attention(q[:, :, rows], k, v, attn_mask=torch.where(allow, bias, float("-inf"))[rows])
    # two float32 computations of the same attention: dots of 8 terms, sums of up to 4, scaled by the values
    tol = 16 * (8 + 4) * torch.finfo(torch.float32).eps * v.abs().max().item()
    assert (got[:, :, rows] - want).abs().max().item() <= tol
