"""Block-sparse attention kernels against a float64 dense masked reference.

On a machine without a GPU the Triton kernels run under Triton's interpreter (TRITON_INTERPRET=1,
set here before triton is imported), so shapes are tiny. With a GPU the same cases run on it in
fp32 (TF32 matmuls), fp16 and bf16.

Tolerances come from the computation (:func:`tol`), not from one machine's rounding: an output is a
softmax-weighted sum over at most ``Lk`` keys of scores that are dot products over ``D`` terms, accumulated
in float32 (worst case ``(D + Lk) * eps32``), plus a few roundings to the inputs' dtype (``eps(dtype)``
each; TF32's for float32 dots on a GPU); ``4 * (eps + (D + Lk) * eps32)``, twice that for gradients (two
chained reductions). Norm-relative errors against float64 on the same inputs; a dropped or double-counted
block gives errors of order 1e-1..1.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from attnprune.errors import InvalidArgumentError  # noqa: E402
from attnprune.kernels import BlockLayout, KernelConfig, sparse_attention  # noqa: E402
from attnprune.kernels.layout import _pack_bits, _unpack_bits  # noqa: E402

if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

DEV = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16] if HAS_CUDA else [torch.float32]
TF32_EPS = 2.0 ** -10  # on a GPU Triton's float32 dots run as TF32 (10 explicit mantissa bits)


def tol(dtype, D, Lk, grad=False):
    """``4 * (eps(dtype) + (D + Lk) * eps32)`` (module docs), twice that for gradients; on a GPU float32
    inputs count with TF32's eps (the kernels' dots)."""
    eps = TF32_EPS if (HAS_CUDA and dtype == torch.float32) else torch.finfo(dtype).eps
    t = 4 * (eps + (D + Lk) * torch.finfo(torch.float32).eps)
    return 2 * t if grad else t


# ----------------------------------------------------------------------------- reference
def allowed_mask(tok, B, Lq, Lk, causal=False, q_offset=0, key_padding=None):
    """bool [B, H, Lq, Lk] of entries the kernel may attend."""
    a = tok[None].expand(B, -1, -1, -1).clone()
    if causal:
        a &= (torch.arange(Lk, device=tok.device)[None, :] <= torch.arange(Lq, device=tok.device)[:, None] + q_offset)
    if key_padding is not None:
        if key_padding.dtype != torch.bool:
            key_padding = torch.arange(Lk, device=tok.device)[None, :] < key_padding[:, None].to(tok.device)
        a &= key_padding.to(tok.device)[:, None, None, :]
    return a


def reference(q, k, v, allowed, scale):
    """float64 masked attention; rows with nothing allowed -> 0."""
    G = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(G, 1)
    v = v.double().repeat_interleave(G, 1)
    s = (q.double() @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_case(B, Hq, Hkv, Lq, Lk, D, layout, tok, *, dtype=torch.float32, causal=False, q_offset=0,
             key_padding=None, DV=None, configs=None, layout_heads=None):
    DV = DV or D
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    q = torch.randn(B, Hq, Lq, D, generator=gen).to(DEV, dtype).requires_grad_()
    k = torch.randn(B, Hkv, Lk, D, generator=gen).to(DEV, dtype).requires_grad_()
    v = torch.randn(B, Hkv, Lk, DV, generator=gen).to(DEV, dtype).requires_grad_()
    out = sparse_attention(q, k, v, layout, causal=causal, q_offset=q_offset, key_padding=key_padding,
                           configs=configs)
    assert out.shape == (B, Hq, Lq, DV) and out.dtype == dtype
    assert torch.isfinite(out).all()
    if tok.shape[0] == 1 and Hq > 1:
        tok = tok.expand(Hq, -1, -1)
    allowed = allowed_mask(tok.to(DEV), B, Lq, Lk, causal, q_offset, key_padding)
    scale = D ** -0.5
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = reference(qd, kd, vd, allowed, scale)
    assert rel(out, ref) < tol(dtype, D, Lk), f"forward error {rel(out, ref):.2e}"
    go = torch.randn(out.shape, generator=gen).to(DEV, dtype)
    grads = torch.autograd.grad(out, (q, k, v), go)
    rgrads = torch.autograd.grad(ref, (qd, kd, vd), go.double())
    for name, g, r in zip("qkv", grads, rgrads):
        assert torch.isfinite(g).all(), f"d{name} not finite"
        assert rel(g, r) < tol(dtype, D, Lk, grad=True), f"d{name} error {rel(g, r):.2e}"
    return out, grads, allowed


def random_tokens(H, Lq, Lk, block, density=0.5, token_p=0.7, device=DEV):
    """Token mask made of random kept blocks, some of them only partly kept."""
    bq, bk = block
    qb, kb = -(-Lq // bq), -(-Lk // bk)
    blocks = torch.rand(H, qb, kb) < density
    tok = blocks.repeat_interleave(bq, 1).repeat_interleave(bk, 2)[:, :Lq, :Lk]
    partial = (torch.rand(H, qb, kb) < 0.5).repeat_interleave(bq, 1).repeat_interleave(bk, 2)[:, :Lq, :Lk]
    tok = tok & (~partial | (torch.rand(H, Lq, Lk) < token_p))
    return tok.to(device)


# ----------------------------------------------------------------------------- layout
def test_pack_bits_roundtrip():
    x = torch.rand(5, 16, 64) < 0.5
    x[0, 0, 31] = True  # sign bit of a word
    assert torch.equal(_unpack_bits(_pack_bits(x), 64), x)
    y = torch.rand(3, 16, 16) < 0.5
    assert torch.equal(_unpack_bits(_pack_bits(y), 16), y)


def test_layout_from_tokens_roundtrip_and_blocks():
    tok = random_tokens(3, 50, 70, (16, 32), device="cpu")
    lay = BlockLayout.from_tokens(tok, (16, 32))
    assert torch.equal(lay.to_dense(), tok)
    bm = lay.block_mask()
    assert bm.shape == (3, 4, 3)
    blocks = torch.nn.functional.pad(tok, (0, 96 - 70, 0, 64 - 50)).reshape(3, 4, 16, 3, 32).any(-1).any(2)
    assert torch.equal(bm, blocks)
    assert 0 < lay.num_partial <= lay.nnz
    assert lay.q_len == 50 and lay.k_len == 70


def test_layout_from_blocks_plan():
    keep = torch.rand(2, 5, 6) < 0.5
    keep[1, 2] = False
    lay = BlockLayout.from_blocks(keep, (16, 16))
    assert torch.equal(lay.block_mask(), keep)
    assert lay.num_partial == 0 and lay.nnz == int(keep.sum())
    plan = lay.plan(80, 96)
    # forward lists = rows of keep
    for r in range(10):
        cols = plan.fwd_col[plan.fwd_ptr[r]:plan.fwd_ptr[r + 1]].tolist()
        assert sorted(cols) == keep.reshape(10, 6)[r].nonzero().flatten().tolist()
    # transposed lists = columns of keep
    for c in range(12):
        h, kb = divmod(c, 6)
        rows = plan.bwd_row[plan.bwd_ptr[c]:plan.bwd_ptr[c + 1]].tolist()
        assert sorted(rows) == keep[h, :, kb].nonzero().flatten().tolist()
    # causal drops future blocks; lengths drop blocks past the end
    pc = lay.plan(80, 96, causal=True)
    assert pc.nnz == int((keep & torch.ones(5, 6, dtype=torch.bool).tril()).sum())
    assert lay.plan(40, 40).nnz == int(keep[:, :3, :3].sum())
    assert lay.plan(80, 96) is plan  # cached
    with pytest.raises(InvalidArgumentError):
        lay.plan(81, 96)


@pytest.mark.parametrize("causal,q_offset", [(False, 0), (True, 0), (True, 13)])
def test_plan_against_brute_force(causal, q_offset):
    H, Lq, Lk, bq, bk = 2, 70, 90, 16, 32
    tok = random_tokens(H, Lq, Lk, (bq, bk), density=0.6, device="cpu")
    lay = BlockLayout.from_tokens(tok, (bq, bk))
    lq, lk = 61, 83  # shorter than the layout: trailing blocks partly or wholly unused
    plan = lay.plan(lq, lk, causal, q_offset)
    codes = lay.code_table()

    def expected(h, qb, kb):
        """None if dropped, else whether the block needs per-element masking."""
        if codes[h, qb, kb] == -2 or qb * bq >= lq or kb * bk >= lk:
            return None
        if causal and kb * bk > min((qb + 1) * bq, lq) - 1 + q_offset:
            return None
        return bool(codes[h, qb, kb] >= 0 or (kb + 1) * bk > lk or (causal and (kb + 1) * bk - 1 > qb * bq + q_offset))

    def check(ptr, nclean, inner, n_outer, n_inner, fwd):
        for h in range(H):
            for a in range(n_outer):
                r = h * n_outer + a
                got = inner[ptr[r]:ptr[r + 1]].tolist()
                exp = {c: expected(h, a, c) if fwd else expected(h, c, a) for c in range(n_inner)}
                clean = [c for c, m in exp.items() if m is False]
                masked = [c for c, m in exp.items() if m is True]
                assert got == clean + masked and int(nclean[r]) == len(clean)

    check(plan.fwd_ptr, plan.fwd_nclean, plan.fwd_col, lay.q_blocks, lay.k_blocks, True)
    check(plan.bwd_ptr, plan.bwd_nclean, plan.bwd_row, lay.k_blocks, lay.q_blocks, False)


def test_layout_build_does_not_need_tokens():
    keep = torch.rand(4, 256, 256) < 0.1  # a 32k x 32k layout at 128x128 blocks
    lay = BlockLayout.from_blocks(keep, (128, 128))
    assert lay.q_len == 32768 and lay.nnz == int(keep.sum())
    assert lay.bits.numel() == 0


def test_bad_inputs():
    lay = BlockLayout.from_blocks(torch.ones(2, 2, 2, dtype=torch.bool), (16, 16))
    q = torch.randn(1, 3, 32, 16, device=DEV)
    k = torch.randn(1, 1, 32, 16, device=DEV)
    with pytest.raises(InvalidArgumentError):
        sparse_attention(q, k, k, lay)  # layout heads 2 != 3
    with pytest.raises(InvalidArgumentError):
        BlockLayout.from_blocks(torch.ones(1, 2, 2, dtype=torch.bool), (24, 16))


# ----------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_token_mask_odd_lengths_gqa(dtype):
    Hq, Hkv, Lq, Lk, D = 4, 2, 45, 45, 32
    tok = random_tokens(Hq, Lq, Lk, (16, 16))
    lay = BlockLayout.from_tokens(tok, (16, 16))
    assert lay.num_partial > 0
    run_case(2, Hq, Hkv, Lq, Lk, D, lay, tok, dtype=dtype)


def test_cross_attention_rectangular_blocks():
    Hq, Hkv, Lq, Lk, D = 2, 1, 23, 71, 16
    tok = random_tokens(Hq, Lq, Lk, (16, 32))
    lay = BlockLayout.from_tokens(tok, (16, 32))
    run_case(1, Hq, Hkv, Lq, Lk, D, lay, tok)


@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_self(dtype):
    Hq, Lq, D = 2, 50, 32
    tok = random_tokens(Hq, Lq, Lq, (16, 16), density=0.7)
    lay = BlockLayout.from_tokens(tok, (16, 16))
    run_case(1, Hq, Hq, Lq, Lq, D, lay, tok, dtype=dtype, causal=True)


def test_causal_with_offset_kv_cache():
    Hq, Lq, Lk, D = 2, 20, 52, 16
    tok = random_tokens(Hq, Lq, Lk, (16, 16), density=0.8)
    lay = BlockLayout.from_tokens(tok, (16, 16))
    run_case(1, Hq, 1, Lq, Lk, D, lay, tok, causal=True, q_offset=Lk - Lq)


def test_key_padding_bool_and_lengths():
    Hq, Lq, Lk, D = 2, 33, 40, 16
    tok = random_tokens(Hq, Lq, Lk, (16, 16), density=0.8)
    lay = BlockLayout.from_tokens(tok, (16, 16))
    kp = torch.rand(2, Lk, device=DEV) < 0.8
    run_case(2, Hq, Hq, Lq, Lk, D, lay, tok, key_padding=kp)
    lens = torch.tensor([40, 17], device=DEV)
    run_case(2, Hq, Hq, Lq, Lk, D, lay, tok, key_padding=lens, causal=True, q_offset=7)


def test_inference_path_matches_reference_and_autograd_path():
    """Under no_grad the forward launches without autograd, with launch parameters memoised per layout
    and call shape and shared placeholders for absent padding/bitmasks: alternate shapes, padding and
    layouts with and without partial blocks on one layout object, against float64 and the grad path."""
    Hq, Hkv, L, D = 4, 2, 40, 16
    tok = random_tokens(Hq, L, L, (16, 16), density=0.7)
    blocks = torch.rand(Hq, 3, 3) < 0.6
    lays = {"partial": BlockLayout.from_tokens(tok, (16, 16)), "blocks": BlockLayout.from_blocks(blocks, (16, 16))}
    toks = {"partial": tok, "blocks": blocks.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, :L, :L].to(DEV)}
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    for B, kind, pad in [(1, "partial", False), (3, "partial", True), (1, "partial", True), (3, "blocks", False),
                         (1, "blocks", True), (1, "partial", False)]:
        q, k, v = (torch.randn(B, h, L, D, generator=gen).to(DEV) for h in (Hq, Hkv, Hkv))
        kp = (torch.rand(B, L, generator=gen) < 0.7).to(DEV) if pad else None
        with torch.no_grad():
            out = sparse_attention(q, k, v, lays[kind], causal=True, key_padding=kp)
        assert out.grad_fn is None
        ref = reference(q, k, v, allowed_mask(toks[kind], B, L, L, True, 0, kp), D ** -0.5)
        assert rel(out, ref) < tol(torch.float32, D, L), (B, kind, pad)
        q.requires_grad_()
        assert torch.equal(sparse_attention(q, k, v, lays[kind], causal=True, key_padding=kp).detach(), out)


def test_block_layout_split_into_smaller_tiles_shared_heads():
    # layout blocks 32x32, kernel tiles 16x16; one layout shared by all heads
    Hq, Hkv, Lq, Lk, D = 4, 2, 64, 96, 16
    keep = torch.rand(1, 2, 3) < 0.6
    keep[0, 0, 0] = True
    lay = BlockLayout.from_blocks(keep.to(DEV), (32, 32))
    tok = lay.to_dense()
    cfg = {"fwd": KernelConfig(16, 16), "dq": KernelConfig(16, 16), "dkdv": KernelConfig(16, 16)}
    run_case(1, Hq, Hkv, Lq, Lk, D, lay, tok, configs=cfg)
    run_case(1, Hq, Hkv, Lq, Lk, D, lay, tok, configs=cfg, causal=True)
    pre = KernelConfig(16, 16, 4, 1, False, True)  # scores scaled before exp2 in the backward
    run_case(1, Hq, Hkv, Lq, Lk, D, lay, tok, configs={**cfg, "dq": pre, "dkdv": pre}, causal=True)


def test_forward_tma_descriptors_gqa_batch():
    # K/V tiles of unmasked blocks through TMA descriptors over the [B*Hkv*Lk, D] view
    Hq, Hkv, L, D = 4, 2, 48, 16
    tok = random_tokens(Hq, L, L, (16, 16), density=0.7)
    lay = BlockLayout.from_tokens(tok, (16, 16))
    cfg = {"fwd": KernelConfig(16, 16, 4, 1, True)}
    run_case(2, Hq, Hkv, L, L, D, lay, tok, configs=cfg, causal=True)


def test_block_layout_odd_lengths_no_bitmasks():
    # block-level layout (no packed bitmasks): boundary and causal masking still exact
    Hq, Hkv, Lq, Lk, D = 2, 1, 37, 45, 16
    keep = (torch.rand(Hq, 3, 3) < 0.7).to(DEV)
    lay = BlockLayout.from_blocks(keep, (16, 16))
    assert lay.num_partial == 0
    tok = lay.to_dense(Lq, Lk)
    run_case(2, Hq, Hkv, Lq, Lk, D, lay, tok, causal=True, q_offset=Lk - Lq)
    run_case(2, Hq, Hkv, Lq, Lk, D, lay, tok, key_padding=torch.tensor([45, 20], device=DEV))


def test_empty_rows_are_zero_with_zero_grad():
    Hq, Lq, Lk, D = 2, 40, 40, 16
    tok = random_tokens(Hq, Lq, Lk, (16, 16), density=0.9)
    tok[0, 5] = False  # one empty token row inside a kept block
    tok[1, 16:32] = False  # a whole empty query block
    lay = BlockLayout.from_tokens(tok, (16, 16))
    out, (dq, dk, dv), _ = run_case(1, Hq, Hq, Lq, Lk, D, lay, tok)
    assert (out[0, 0, 5] == 0).all() and (out[0, 1, 16:32] == 0).all()
    assert (dq[0, 0, 5] == 0).all() and (dq[0, 1, 16:32] == 0).all()


def test_head_dim_not_power_of_two_and_dv():
    Hq, Lq, Lk = 2, 24, 24
    tok = random_tokens(Hq, Lq, Lk, (16, 16), density=0.8)
    lay = BlockLayout.from_tokens(tok, (16, 16))
    run_case(1, Hq, Hq, Lq, Lk, 24, lay, tok, DV=16)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="GPU-sized shapes (d = 32..256, 1000 tokens) need CUDA")
@pytest.mark.parametrize("D", [32, 64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_real_sizes(D, causal):
    Hq, Hkv, L = 4, 2, 1000
    tok = random_tokens(Hq, L, L, (128, 128), density=0.5)
    lay = BlockLayout.from_tokens(tok, (128, 128))
    run_case(2, Hq, Hkv, L, L, D, lay, tok, dtype=torch.bfloat16, causal=causal)
    keep = (torch.rand(Hq, 8, 8) < 0.5).to(DEV)
    lay = BlockLayout.from_blocks(keep, (128, 128))
    run_case(2, Hq, Hkv, L, L, D, lay, lay.to_dense(L, L), dtype=torch.float16, causal=causal)


@pytest.mark.parametrize("tiles", [(32, 64), (16, 16), (64, 128), (32, 32)])
def test_bitmask_words_spread_over_tiles_of_every_width(tiles):
    """Token-exact 128 x 128 blocks (4 bitmask words per row) read by kernel tiles 16 to 128 columns wide:
    a tile spans 1 word at an offset (16), 1 (32), 2 (64) or 4 (128) words; forward and gradients against
    float64 with odd lengths, causality with an offset, GQA and key padding."""
    Hq, Hkv, Lq, Lk, D = 2, 1, 150, 200, 16
    tok = random_tokens(Hq, Lq, Lk, (128, 128), density=0.9, token_p=0.6)
    lay = BlockLayout.from_tokens(tok, (128, 128))
    assert lay.num_partial > 0
    m, n = tiles
    cfg = {"fwd": KernelConfig(m, n), "dq": KernelConfig(m, n), "dkdv": KernelConfig(m, n)}
    run_case(2, Hq, Hkv, Lq, Lk, D, lay, tok, configs=cfg, causal=True, q_offset=Lk - Lq,
             key_padding=torch.tensor([200, 131], device=DEV))
