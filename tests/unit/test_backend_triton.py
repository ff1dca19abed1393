"""``backend="triton"`` and ``backend="flex"`` on real ``SiteMask`` objects, against a float64 reference.

Without a GPU the Triton kernels run under the interpreter and FlexAttention runs eagerly (forward
only: PyTorch has no CPU FlexAttention backward); shapes are tiny.

Tolerances come from the computation: one attention call as ``test_kernels.tol`` (float32 inputs; TF32 on a
GPU); a whole model (``_compare_backends``) against the model in float64, within four times the float32
error the reference backend itself makes there plus one call's bound per attention site (each site's error
enters the logits once, to first order).
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from attnprune.backends.triton import kernel_block, split_attn_mask, triton_backend  # noqa: E402
from attnprune.errors import LengthError  # noqa: E402
from attnprune.kernels import BlockLayout  # noqa: E402
from attnprune.mask import SiteMask  # noqa: E402
from attnprune.sites import SiteInfo  # noqa: E402

if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

DEV = "cuda" if HAS_CUDA else "cpu"

from test_kernels import tol  # noqa: E402  (one call's bound: 4 (eps + (D + Lk) eps32), twice for gradients)
F32 = torch.float32


def ref_attention(q, k, v, allowed, scale=None):
    """float64; allowed bool broadcastable to [B, Hq, Lq, Lk]; empty rows -> 0."""
    G = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(G, 1)
    v = v.double().repeat_interleave(G, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q.double() @ k.transpose(-1, -2)) * scale
    return torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0) @ v


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_site(kind, H, Hkv, lq, lk, block=None, p=0.6):
    info = SiteInfo(f"layers.0.{kind}", kind, H, Hkv)
    if block is None:
        keep = torch.rand(H, lq, lk) < p
    else:
        keep = torch.rand(H, -(-lq // block), -(-lk // block)) < p
    return SiteMask(info, lq, lk, keep=keep, block=block)


def hf_mask(B, Lq, Lk, lens, causal=True, dtype=torch.float32):
    """HF-style additive [B, 1, Lq, Lk] mask: 0 where allowed, finfo.min elsewhere (right padding)."""
    j = torch.arange(Lk)
    allowed = (j[None, :] < torch.as_tensor(lens)[:, None])[:, None, None, :].expand(B, 1, Lq, Lk)
    if causal:
        allowed = allowed & (j[None, :] <= torch.arange(Lq)[:, None] + (Lk - Lq))
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype), allowed


def test_split_attn_mask():
    B, Lq, Lk = 2, 6, 9
    assert split_attn_mask(None, B, Lq, Lk, True, 3) == (None, True, 3)
    kp = torch.rand(B, Lk) < 0.7
    got = split_attn_mask(kp[:, None, None, :], B, Lq, Lk, False, 0)
    assert torch.equal(got[0], kp) and got[1] is False
    add, allowed = hf_mask(B, Lq, Lk, [9, 5])
    kpm, causal, off = split_attn_mask(add, B, Lq, Lk, False, 0)
    assert causal and off == Lk - Lq
    assert torch.equal(kpm, torch.arange(Lk)[None] < torch.tensor([9, 5])[:, None])
    bias = torch.randn(B, 1, Lq, Lk)
    assert split_attn_mask(bias, B, Lq, Lk, False, 0) is None
    weird = torch.rand(B, 1, Lq, Lk) < 0.5
    assert split_attn_mask(weird, B, Lq, Lk, False, 0) is None


def test_kernel_block_choice():
    assert kernel_block(make_site("self", 1, 1, 64, 64, block=32), 64, 64) == (32, 32)
    assert kernel_block(make_site("self", 1, 1, 64, 64), 64, 64) == (64, 64)


@pytest.mark.parametrize("kind", ["self", "causal"])
def test_triton_backend_token_mask(kind):
    B, H, Hkv, L, D = 2, 4, 2, 40, 16
    sm = make_site(kind, H, Hkv, L, L)
    q = torch.randn(B, H, L, D, device=DEV, requires_grad=True)
    k = torch.randn(B, Hkv, L, D, device=DEV, requires_grad=True)
    v = torch.randn(B, Hkv, L, D, device=DEV, requires_grad=True)
    causal = kind == "causal"
    out = triton_backend(q, k, v, sm, is_causal=causal)
    allowed = sm.keep.to(DEV)[None]
    if causal:
        allowed = allowed & torch.ones(L, L, dtype=torch.bool, device=DEV).tril()
    ref = ref_attention(q, k, v, allowed)
    assert rel(out, ref) < tol(F32, D, L)
    go = torch.randn_like(out)
    g = torch.autograd.grad(out, (q, k, v), go)
    gr = torch.autograd.grad(ref, (q, k, v), go.double())
    for a, b in zip(g, gr):
        assert rel(a, b) < tol(F32, D, L, grad=True)


def test_triton_backend_block_mask_with_hf_padding_mask():
    B, H, L, D = 2, 2, 48, 16
    sm = make_site("causal", H, H, L, L, block=16, p=0.7)
    q, k, v = (torch.randn(B, H, L, D, device=DEV) for _ in range(3))
    add, allowed = hf_mask(B, L, L, [48, 30])
    out = triton_backend(q, k, v, sm, attn_mask=add.to(DEV))
    tok = sm.keep_tokens(L, L, device=DEV)
    ref = ref_attention(q, k, v, tok[None] & allowed.to(DEV))
    assert rel(out, ref) < tol(F32, D, L)


def test_triton_backend_kv_cache_offset():
    B, H, Lq, Lk, D = 1, 2, 5, 37, 16
    sm = make_site("causal", H, H, 64, 64)
    q = torch.randn(B, H, Lq, D, device=DEV)
    k, v = (torch.randn(B, H, Lk, D, device=DEV) for _ in range(2))
    out = triton_backend(q, k, v, sm, is_causal=True, q_offset=Lk - Lq)
    tok = sm.keep_tokens(Lq, Lk, device=DEV, q_offset=Lk - Lq)
    j, i = torch.arange(Lk, device=DEV), torch.arange(Lq, device=DEV)
    ref = ref_attention(q, k, v, (tok & (j[None] <= i[:, None] + Lk - Lq))[None])
    assert rel(out, ref) < tol(F32, D, Lk)


def test_triton_backend_beyond():
    sm = make_site("self", 1, 1, 32, 32)
    q = torch.randn(1, 1, 40, 16, device=DEV)
    with pytest.raises(LengthError):
        triton_backend(q, q, q, sm)
    out = triton_backend(q, q, q, sm, beyond="dense")
    ref = ref_attention(q, q, q, sm.keep_tokens(40, 40, device=DEV, beyond="dense")[None])
    assert rel(out, ref) < tol(F32, 16, 40)


def test_triton_backend_falls_back_on_bias():
    from attnprune import backends

    if not hasattr(backends, "BACKENDS") or "reference" not in backends.BACKENDS:
        pytest.skip("reference backend not registered yet")
    sm = make_site("self", 2, 2, 24, 24)
    q, k, v = (torch.randn(1, 2, 24, 16, device=DEV) for _ in range(3))
    bias = torch.randn(1, 1, 24, 24, device=DEV)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = triton_backend(q, k, v, sm, attn_mask=bias)
    assert any("reference" in str(x.message) for x in w)
    assert out.shape == q.shape


def _flex_or_skip():
    try:
        from attnprune.backends.flex import flex_sparse_attention

        lay = BlockLayout.from_blocks(torch.ones(1, 1, 1, dtype=torch.bool, device=DEV), (128, 128))
        x = torch.randn(1, 1, 8, 16, device=DEV)
        flex_sparse_attention(x, x, x, lay)
    except Exception as e:  # flex may be unavailable on this torch/device
        pytest.skip(f"FlexAttention does not run here: {type(e).__name__}: {str(e)[:120]}")
    return flex_sparse_attention


@pytest.mark.parametrize("causal", [False, True])
def test_flex_matches_reference(causal):
    flex_sparse_attention = _flex_or_skip()
    B, H, Hkv, L, D = 1, 2, 1, 200, 16
    tok = torch.rand(H, L, L, device=DEV) < 0.5
    tok[:, :, :128] &= torch.rand(H, 1, 1, device=DEV) < 2  # keep some structure
    tok[0, 128:, 128:] = True  # one fully kept block (a Flex "full" block)
    tok[1, :128, 128:] = False  # one empty block
    lay = BlockLayout.from_tokens(tok, (128, 128))
    grad = HAS_CUDA
    q = torch.randn(B, H, L, D, device=DEV, requires_grad=grad)
    k = torch.randn(B, Hkv, L, D, device=DEV, requires_grad=grad)
    v = torch.randn(B, Hkv, L, D, device=DEV, requires_grad=grad)
    kp = torch.arange(L, device=DEV)[None] < 190
    out = flex_sparse_attention(q, k, v, lay, causal=causal, key_padding=kp)
    allowed = tok[None] & kp[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(L, L, dtype=torch.bool, device=DEV).tril()
    ref = ref_attention(q, k, v, allowed)
    assert rel(out, ref) < tol(F32, D, L)
    if grad:
        go = torch.randn_like(out)
        g = torch.autograd.grad(out, (q, k, v), go)
        gr = torch.autograd.grad(ref, (q, k, v), go.double())
        for a, b in zip(g, gr):
            assert rel(a, b) < tol(F32, D, L, grad=True)


# ----------------------------------------------------------------------------- end to end through apply()
def _random_mask(infos, L, density=0.4, seed=0):
    from attnprune.mask import PruneMask

    g = torch.Generator().manual_seed(seed)
    sms = []
    for name, info in infos.items():
        keep = torch.rand(info.num_heads, L, L, generator=g) < density
        keep[:, :, 0] = True
        sms.append(SiteMask(info, L, L, keep=keep))
    return PruneMask(sms, {"model": {"name": "tiny"}})


def _site_infos(model, batch):
    """``{site: SiteInfo}`` and the largest head dimension of the model's attention calls."""
    from attnprune.capture import intercept

    infos, dims = {}, set()
    with torch.no_grad(), intercept(model, lambda c: (dims.add(c.q.shape[-1]), infos.setdefault(c.site, c.info))
                                    and None):
        model(**batch)
    return infos, max(dims)


def _logits(o):
    for attr in ("logits", "last_hidden_state"):
        if hasattr(o, attr):
            return getattr(o, attr)
    return o


def _compare_backends(model, batch, L):
    """The logits with a random token mask on the triton backend against the same model and mask in float64 on
    the reference backend: within four times the float32 reference backend's own error there, plus one call's
    bound (``tol``) per attention site."""
    import copy

    from attnprune.apply import apply

    import attnprune.backends.triton as tb

    tb._warned.clear()
    infos, D = _site_infos(model, batch)
    mask = _random_mask(infos, L)
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        with apply(model64, mask, backend="reference"):
            ref64 = _logits(model64(**batch))
        with apply(model, mask, backend="reference"):
            ref = _logits(model(**batch))
        with warnings.catch_warnings(record=True) as w, apply(model, mask, backend="triton"):
            warnings.simplefilter("always")
            out = _logits(model(**batch))
    assert not [x for x in w if "reference backend" in str(x.message)], "triton backend fell back"
    with torch.no_grad():
        dense = _logits(model(**batch))
    bound = 4 * rel(ref, ref64) + len(infos) * tol(F32, D, L)
    err, effect = rel(out, ref64), rel(dense, ref64)
    assert err < bound, (err, bound)
    # the comparison is not vacuous: the mask moves the output far more than the backends differ
    assert effect > 1e-3 and effect > 5 * err, (effect, err)


def test_apply_triton_matches_reference_nanogpt():
    import tiny_models as tm

    model = tm.nanogpt().to(DEV)
    ids = tm.batch([20, 20], 20)["input_ids"].to(DEV)
    _compare_backends(model, {"input_ids": ids}, 20)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_apply_triton_matches_reference_hf_padded(name):
    # llama: GQA, causal; bert: bidirectional; both with right padding through an attention mask
    pytest.importorskip("transformers")
    import tiny_models as tm

    model = getattr(tm, name)().to(DEV)
    b = {k: v.to(DEV) for k, v in tm.batch([12, 7], 12).items()}
    _compare_backends(model, b, 12)


def test_triton_backend_under_autocast_with_mixed_dtypes():
    """Under autocast a Llama's rotary embedding leaves q, k in float32 and v in the autocast dtype; the
    backend casts all three to the autocast dtype, as scaled_dot_product_attention does (it used to
    refuse). bfloat16 on the GPU; float16 under the interpreter (which miscomputes bfloat16: numpy has none)."""
    dt, eps = (torch.bfloat16, 2 ** -8) if HAS_CUDA else (torch.float16, 2 ** -11)
    B, H, L, D = 1, 2, 32, 16
    sm = make_site("causal", H, H, L, L, block=16, p=0.7)
    q, k = (torch.randn(B, H, L, D, device=DEV) for _ in range(2))
    v = torch.randn(B, H, L, D, device=DEV).to(dt)
    with torch.autocast(DEV, dtype=dt):
        out = triton_backend(q, k, v, sm, is_causal=True)
    assert out.dtype == dt
    qb, kb = q.to(dt), k.to(dt)
    same = triton_backend(qb, kb, v, sm, is_causal=True)
    assert torch.equal(out, same)  # exactly the call on inputs of one dtype
    tok = sm.keep_tokens(L, L, device=DEV) & torch.ones(L, L, dtype=torch.bool, device=DEV).tril()
    ref = ref_attention(qb, kb, v, tok[None])
    assert rel(out, ref) < 4 * eps  # a few roundings of the autocast dtype
    with pytest.raises(Exception, match="fp16/bf16/fp32"):  # without autocast mixed dtypes stay an error
        triton_backend(q, k, v, sm, is_causal=True)
