"""masked_decode (kernels/decode.py) against its float64 reference: token and block keep tables,
GQA, empty slots, windows, rows with nothing allowed, n = 1 and n > 1, odd C, several splits
(under TRITON_INTERPRET=1 on the CPU; on a GPU the same tests run the compiled kernel)."""

import pytest
import torch

pytest.importorskip("triton")

from attnprune.kernels.decode import masked_decode, masked_decode_reference  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(seed, B, Hq, Hkv, n, C, D, L=48, block=1, density=0.5, empty=0.2, dv=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, n, D, generator=g)
    k = torch.randn(B, Hkv, C, D, generator=g)
    v = torch.randn(B, Hkv, C, dv or D, generator=g)
    pos = torch.stack([torch.stack([torch.randperm(L, generator=g)[:C] for _ in range(Hkv)]) for _ in range(B)])
    pos = torch.where(torch.rand(B, Hkv, C, generator=g) < empty, -1, pos)
    q_pos = L - n + torch.arange(n)[None].repeat(B, 1) - torch.randint(0, 4, (B, 1), generator=g)
    nb = -(-L // block)
    keep = torch.rand(Hq, nb, nb, generator=g) < density
    return [t.to(DEV) for t in (q, k, v, pos, q_pos, keep)]


def _check(args, block=1, dtype=torch.float32, tol=2e-5, **kw):
    q, k, v, pos, q_pos, keep = args
    q, k, v = (t.to(dtype) for t in (q, k, v))
    ref = masked_decode_reference(q, k, v, pos, q_pos, keep, block, scale=kw.get("scale"), window=kw.get("window"),
                                  q_len=kw.get("q_len"), k_len=kw.get("k_len"))
    out = masked_decode(q, k, v, pos, q_pos, keep, block, **kw)
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    return out, ref


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("D", [16, 32, 64])
def test_token_mask_gqa(n, splits, D):
    args = _inputs(D + n + splits, B=2, Hq=6, Hkv=2, n=n, C=37, D=D)
    _check(args, splits=splits, block_n=16)


@pytest.mark.parametrize("window", [None, 9])
def test_block_mask_window_and_scale(window):
    args = _inputs(5, B=2, Hq=4, Hkv=4, n=2, C=29, D=32, L=64, block=8)
    _check(args, block=8, window=window, scale=0.3, splits=2, block_n=16)


def test_rows_with_nothing_allowed_are_zero():
    q, k, v, pos, q_pos, keep = _inputs(7, B=2, Hq=4, Hkv=2, n=2, C=21, D=16)
    keep[1] = False  # head 1 keeps nothing
    pos[1, 1] = -1  # sequence 1, kv head 1 (query heads 2, 3): an all-empty cache
    out, ref = _check([q, k, v, pos, q_pos, keep], splits=2, block_n=16)
    assert out[:, 1].abs().max() == 0 and out[1, 2:].abs().max() == 0


def test_query_positions_broadcast_and_outside_calibration_kept():
    q, k, v, pos, q_pos, keep = _inputs(8, B=3, Hq=2, Hkv=1, n=1, C=19, D=16, L=40)
    # one row of query positions for all sequences, partly past the calibrated 32 x 32 region
    _check([q, k, v, pos, q_pos[:1], keep[:, :32, :32]], q_len=32, k_len=32, splits=2, block_n=16)


def test_odd_head_dim_and_other_value_dim():
    args = _inputs(9, B=1, Hq=2, Hkv=1, n=2, C=13, D=24, dv=8)
    _check(args, splits=1, block_n=16)


# the interpreter computes bf16 wrongly (numpy has no bfloat16): bf16 on a GPU only
@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if DEV == "cuda" else []))
def test_half_precision_and_default_launch(dtype):
    args = _inputs(10, B=2, Hq=3, Hkv=1, n=1, C=40, D=32)
    _check(args, dtype=dtype, tol=3e-2)


@pytest.mark.skipif(DEV != "cuda", reason="CUDA only")
def test_smollm2_shape_many_splits():
    args = _inputs(12, B=8, Hq=9, Hkv=3, n=1, C=700, D=64, L=1024, block=64, density=0.3)
    _check(args, block=64, dtype=torch.bfloat16, tol=3e-2)


def test_strided_inputs():
    q, k, v, pos, q_pos, keep = _inputs(11, B=2, Hq=4, Hkv=2, n=1, C=20, D=16)
    big_k = torch.zeros(2, 2, 32, 16, device=DEV)
    big_k[:, :, :20] = k
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, n, H, D] memory, as HF passes it
    _check([qt, big_k[:, :, :20], v, pos, q_pos, keep], splits=2, block_n=16)


@pytest.mark.parametrize("family,every", [("llama", 32), ("llama", 3), ("mistral-sliding", 32)])
def test_pruned_cache_generation_through_the_kernel(family, every, monkeypatch):
    """PrunedKVCache decoding with attention through masked_decode (forced on the CPU under the
    interpreter) gives the tokens and logits of masked full recomputation, left padding included,
    with compactions every ``every`` steps (the kernel reads the buffer's empty room too)."""
    from attnprune import PrunedKVCache, apply
    from attnprune import cache as cache_mod
    from attnprune.kernels import decode
    from lm_helpers import _close, _family, _generate, _left_padded, _mask

    monkeypatch.setattr(cache_mod, "COMPACT_EVERY", every)
    calls = []
    real = decode.masked_decode
    monkeypatch.setattr(decode, "FORCE", DEV == "cpu")
    monkeypatch.setattr(decode, "masked_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = _family(family)
    mask = _mask(model)
    g = torch.Generator().manual_seed(3)
    ids, am = _left_padded([torch.randint(3, 97, (n,), generator=g) for n in (8, 5)])
    model, ids, am = model.to(DEV), ids.to(DEV), am.to(DEV)
    with torch.no_grad(), apply(model, mask):
        seq_p, log_p = _generate(model, ids, 10, attention_mask=am, past_key_values=PrunedKVCache(model, mask))
        seq_n, log_n = _generate(model, ids, 10, attention_mask=am, use_cache=False)
    assert calls
    assert torch.equal(seq_p, seq_n)
    _close(log_p, log_n)


def test_launch_plan_cache_keeps_checks_and_strides():
    """The launch plan is cached per call shapes: a second call with other strides (same shapes)
    reads its own strides, and a bad call raises however many good ones came before."""
    from attnprune.errors import InvalidArgumentError

    q, k, v, pos, q_pos, keep = _inputs(13, B=2, Hq=4, Hkv=2, n=1, C=20, D=16)
    _check([q, k, v, pos, q_pos, keep], splits=2, block_n=16)
    big_v = torch.zeros(2, 2, 20, 32, device=DEV)
    big_v[..., 5:21] = v
    _check([q, k, v.transpose(-1, -2).contiguous().transpose(-1, -2), pos, q_pos, keep], splits=2, block_n=16)
    _check([q, k, big_v[..., 5:21], pos, q_pos, keep], splits=2, block_n=16)
    with pytest.raises(InvalidArgumentError, match="q_pos"):
        masked_decode(q, k, v, pos, q_pos[:, :0], keep, splits=2, block_n=16)
    with pytest.raises(InvalidArgumentError, match="bad shapes"):
        masked_decode(q, k, v, pos[:, :, 1:], q_pos, keep, splits=2, block_n=16)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("variant", ["sinks", "softcap", "both"])
def test_sinks_and_softcap(splits, variant):
    """Attention sinks (gpt-oss) and logit capping (Gemma 2), one split (sink in the kernel's denominator)
    and several (in the combine kernel); rows with nothing allowed stay 0 (all mass on the sink)."""
    q, k, v, pos, q_pos, keep = _inputs(11 + splits, B=2, Hq=6, Hkv=2, n=2, C=37, D=32)
    q = q * 3  # scores past the cap
    keep[4] = False  # head 4 keeps nothing
    sinks = torch.randn(6, generator=torch.Generator().manual_seed(3), device="cpu").to(DEV) * 2
    kw = dict(sinks=sinks if variant != "softcap" else None, softcap=0.7 if variant != "sinks" else None)
    ref = masked_decode_reference(q, k, v, pos, q_pos, keep, 1, **kw)
    out = masked_decode(q, k, v, pos, q_pos, keep, 1, splits=splits, block_n=16, **kw)
    tol = 4 * (37 + 32) * torch.finfo(torch.float32).eps  # float32 sums of C + D terms of values ~1
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    assert out[:, 4].abs().max() == 0
    plain = masked_decode_reference(q, k, v, pos, q_pos, keep, 1)
    assert (plain - ref).abs().max() > 1e-2  # the variant changes the result at this scale
