"""The split path of the flash backend (``ATTNPRUNE_FA4_PARTIAL=split``): the full blocks on one kernel,
the partial / diagonal / end-of-keys blocks on the Triton kernel, merged through the log-sum-exp.

On the CPU the full part is the Triton kernel itself on the full-only layout (``full="triton"``, under
Triton's interpreter), so the split, the merge and the backward are checked against the float64
reference here; FA4 as the full part runs only on an sm90+ GPU (the ``gpu`` test at the end).

Tolerances come from the computation, not from one machine: an output is a softmax-weighted sum over
at most ``Lk`` keys of scores that are dot products over ``D`` terms, accumulated in float32, so the
worst-case accumulation bound is ``n * eps32`` with ``n = D + Lk`` terms (``gamma_n``); on top of it come a
few roundings to the inputs' dtype (P before the PV product, each part's output, the merged output, each
part's gradient before the sum): ``eps(dtype)`` each. Hence ``4 * (eps(dtype) + n * eps32)``, the 4
covering exp2, the normalisation, the lse conversions and those roundings; gradients chain two such
reductions (``dP = dO V^T``, then ``dS^T Q`` / ``P^T dO``): twice that. Norm-relative errors against float64
on the same (rounded) inputs; a dropped or double-counted block gives errors of order 1e-1..1.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from attnprune.backends import _flash_split as fs  # noqa: E402
from attnprune.backends import flash  # noqa: E402
from attnprune.backends.flash import fa4_block_tables, fa4_metadata  # noqa: E402
from attnprune.errors import InvalidArgumentError  # noqa: E402
from attnprune.kernels import BlockLayout, sparse_attention  # noqa: E402
from test_kernels import allowed_mask, random_tokens, reference, rel, tol  # noqa: E402

if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

DEV = "cuda" if HAS_CUDA else "cpu"


def causal_ok(lq, lk, off, device="cpu"):
    return torch.arange(lk, device=device)[None, :] <= torch.arange(lq, device=device)[:, None] + off


# ----------------------------------------------------------------------------- the split
@pytest.mark.parametrize("lq,lk,causal,off", [(61, 83, False, 0), (64, 96, False, 0), (70, 90, True, 0),
                                             (45, 90, True, 45), (90, 90, True, -20)])
@pytest.mark.parametrize("block", [(16, 16), (16, 32)])
def test_split_partitions_every_entry_once(lq, lk, causal, off, block):
    torch.manual_seed(lq * 7 + lk + off)
    tok = random_tokens(3, 96, 96, block, density=0.7, device="cpu")
    lay = BlockLayout.from_tokens(tok, block)
    sp = fs.split_layout(lay, lq, lk, causal, off)
    allowed = lay.to_dense(lq, lk)
    c = causal_ok(lq, lk, off) if causal else torch.ones(lq, lk, dtype=torch.bool)
    allowed = allowed & c
    full = sp.full.to_dense(lq, lk) if sp.full is not None else torch.zeros_like(allowed)
    part = (sp.part.to_dense(lq, lk) & c) if sp.part is not None else torch.zeros_like(allowed)
    assert not (full & ~c).any(), "a full block reaches into the causal future"
    assert not (full & part).any(), "an entry counted twice"
    assert torch.equal(full | part, allowed), "an entry dropped or added"
    f_tab, p_tab = fa4_block_tables(lay, lq, lk, causal, off)
    assert sp.n_full == int(f_tab.sum()) and sp.n_part == int(p_tab.sum())
    if sp.full is not None:  # FA4 gets no mask list at all for the full part (no mask_mod without key padding)
        assert sp.full.num_partial == 0
        meta = fa4_metadata(sp.full, lq, lk, causal=False)
        assert int(meta["fwd"][0].sum()) == 0 and int(meta["fwd"][2].sum()) == sp.n_full
        assert int(meta["bwd"][0].sum()) == 0 and int(meta["bwd"][2].sum()) == sp.n_full
    if sp.part is not None:  # nothing in the partial part could have run unmasked
        assert not fa4_block_tables(sp.part, lq, lk, causal, off)[0].any()
        assert sp.part.num_partial <= lay.num_partial
    assert fs.split_layout(lay, lq, lk, causal, off) is sp  # cached on the layout


def test_split_of_block_exact_and_all_partial_layouts():
    keep = torch.rand(2, 4, 4) < 0.6
    keep[:, 0, 0] = True
    lay = BlockLayout.from_blocks(keep, (16, 16))
    sp = fs.split_layout(lay, 64, 64)
    assert sp.part is None and sp.n_full == int(keep.sum())
    sp = fs.split_layout(lay, 64, 60)  # the block holding the end of the keys goes to the partial part
    assert sp.part is not None and sp.n_part == int(keep[:, :, 3].sum())
    tok = torch.rand(2, 64, 64) < 0.5  # every block partial
    lay = BlockLayout.from_tokens(tok, (16, 16))
    sp = fs.split_layout(lay, 64, 64)
    assert sp.full is None and sp.n_part == lay.nnz


# ----------------------------------------------------------------------------- the merge
def test_merge_exact_and_empty_rows():
    torch.manual_seed(0)
    B, H, L, Dv, Lk = 2, 3, 7, 5, 11
    s = torch.randn(B, H, L, Lk, dtype=torch.float64) * 3
    vv = torch.randn(B, H, Lk, Dv, dtype=torch.float64)
    side = torch.rand(Lk) < 0.5
    a = torch.ones(B, H, L, Lk, dtype=torch.bool)
    a[0, 0, 1] = False  # empty in both
    a[0, 1, 2] = side  # empty in the second part
    a[1, 2, 3] = ~side  # empty in the first part

    def att(mask):
        sm = s.masked_fill(~mask, -math.inf)
        lse = torch.logsumexp(sm, -1)
        p = torch.exp(sm - torch.where(lse == -math.inf, 0.0, lse)[..., None])
        return (p @ vv).float(), lse.float()

    o1, l1 = att(a & side)
    o2, l2 = att(a & ~side)
    o, lse = fs.merge(o1, l1, o2, l2)
    ro, rl = att(a)
    assert torch.isfinite(o).all() and not torch.isnan(lse).any()
    assert float((o.double() - ro.double()).abs().max()) < 16 * Lk * torch.finfo(torch.float32).eps
    assert torch.equal(torch.isinf(lse), torch.isinf(rl)) and lse[0, 0, 1] == -math.inf
    fin = torch.isfinite(rl)
    assert float((lse - rl)[fin].abs().max()) < 16 * torch.finfo(torch.float32).eps * float(rl[fin].abs().max())
    assert (o[0, 0, 1] == 0).all()
    # the Triton kernel's log2 convention round trip, +inf <-> -inf for empty rows
    l2t = torch.tensor([math.inf, 0.0, 3.5, -2.0])
    assert torch.equal(fs._to_log2(fs._to_natural(l2t)), l2t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_merge_equals_merge(dtype):
    torch.manual_seed(1)
    B, H, L, Dv = 2, 3, 70, 32
    o1 = torch.randn(B, L, H, Dv, device=DEV).to(dtype).transpose(1, 2)  # FA4's memory layout
    o2 = torch.randn(B, H, L, Dv, device=DEV).to(dtype)
    l1, l2 = torch.randn(2, B, H, L, device=DEV) * 5
    l1[0, 0, :5] = -math.inf
    l2[0, 0, 3:9] = -math.inf  # rows 3, 4 empty in both
    o1[0, 0, :5] = 0
    o2[0, 0, 3:9] = 0
    o, lse = fs.merge_fused(o1, l1, o2, l2)
    ro, rl = fs.merge(o1, l1, o2, l2)
    assert o.shape == ro.shape and o.dtype == dtype and o.transpose(1, 2).is_contiguous()
    eps = torch.finfo(dtype).eps
    assert float((o.float() - ro.float()).abs().max()) <= 8 * eps * float(ro.float().abs().max())  # exp, divide, sum
    assert torch.equal(torch.isinf(lse), torch.isinf(rl)) and bool((o[0, 0, 3:5] == 0).all())
    fin = torch.isfinite(rl)
    assert float((lse - rl)[fin].abs().max()) < 8 * torch.finfo(torch.float32).eps * float(rl[fin].abs().max())


# ----------------------------------------------------------------------------- split attention vs float64
CASES = {
    # name: B, Hq, Hkv, Lq, Lk, D, causal, q_offset, key padding, block
    "odd": (2, 2, 2, 45, 77, 32, False, 0, None, (16, 16)),
    "gqa": (1, 4, 2, 50, 61, 16, False, 0, None, (16, 32)),
    "causal_offset": (1, 2, 2, 37, 80, 16, True, 43, None, (16, 16)),
    "causal_neg_offset": (1, 2, 1, 64, 64, 16, True, -9, None, (16, 16)),
    "padding_bool": (2, 2, 2, 48, 70, 16, True, 22, "bool", (16, 16)),
    "padding_lengths": (3, 2, 1, 40, 64, 16, False, 0, "lengths", (16, 16)),
    "dv_not_pow2": (1, 2, 2, 33, 47, 24, False, 0, None, (16, 16)),
}


def run_split(B, Hq, Hkv, Lq, Lk, D, tok, block, *, causal=False, q_offset=0, key_padding=None, dtype=torch.float32,
              full="triton", DV=None):
    DV = DV or D
    lay = BlockLayout.from_tokens(tok.to(DEV), block)
    gen = torch.Generator().manual_seed(Lq * Lk + D)
    q = torch.randn(B, Hq, Lq, D, generator=gen).to(DEV, dtype).requires_grad_()
    k = torch.randn(B, Hkv, Lk, D, generator=gen).to(DEV, dtype).requires_grad_()
    v = torch.randn(B, Hkv, Lk, DV, generator=gen).to(DEV, dtype).requires_grad_()
    out = fs.split_attention(q, k, v, lay, causal=causal, q_offset=q_offset, key_padding=key_padding, full=full)
    assert out.shape == (B, Hq, Lq, DV) and out.dtype == dtype and torch.isfinite(out).all()
    with torch.no_grad():  # the inference path (no autograd Function) gives the same output
        assert torch.equal(fs.split_attention(q, k, v, lay, causal=causal, q_offset=q_offset,
                                              key_padding=key_padding, full=full), out)
    t = tok.to(DEV)
    if t.shape[0] == 1 and Hq > 1:
        t = t.expand(Hq, -1, -1)
    allowed = allowed_mask(t, B, Lq, Lk, causal, q_offset, key_padding)
    scale = D ** -0.5
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = reference(q64, k64, v64, allowed, scale)
    assert rel(out, ref) < tol(dtype, D, Lk), rel(out, ref)
    go = torch.randn(out.shape, generator=gen).to(DEV, dtype)
    grads = torch.autograd.grad(out, (q, k, v), go)
    rgrads = torch.autograd.grad(ref, (q64, k64, v64), go.double())
    for name, g, r in zip("qkv", grads, rgrads):
        assert torch.isfinite(g).all(), f"d{name} not finite"
        assert rel(g, r) < tol(dtype, D, Lk, grad=True), (name, rel(g, r))
    return out, grads, allowed, lay


@pytest.mark.parametrize("case", list(CASES))
def test_split_matches_float64(case):
    B, Hq, Hkv, Lq, Lk, D, causal, off, kp, block = CASES[case]
    torch.manual_seed(len(case))
    tok = random_tokens(Hq if case != "causal_neg_offset" else 1, Lq, Lk, block, density=0.7, device="cpu")
    key_padding = None
    if kp == "bool":
        key_padding = torch.ones(B, Lk, dtype=torch.bool)
        key_padding[1, 50:] = False  # right padding inside a block
        key_padding[0, :16] = False  # a whole padded block (left padding)
    elif kp == "lengths":
        key_padding = torch.tensor([64, 17, 40])
    key_padding = None if key_padding is None else key_padding.to(DEV)
    DV = 40 if case == "dv_not_pow2" else None
    _, _, _, lay = run_split(B, Hq, Hkv, Lq, Lk, D, tok, block, causal=causal, q_offset=off,
                             key_padding=key_padding, DV=DV)
    sp = fs.split_layout(lay, Lq, Lk, causal, off)
    assert sp.full is not None and sp.part is not None  # both parts ran: the merge is exercised


def test_rows_empty_in_one_part_and_in_both():
    """q block 0: only a partial block (empty in the full part); q block 1: only full blocks (empty in the
    partial part); q block 2: nothing for head 1 (empty in both: zero output and zero gradient)."""
    Hq, L, b = 2, 48, 16
    tok = torch.zeros(Hq, L, L, dtype=torch.bool)
    tok[:, 0:16, 16:32] = torch.rand(Hq, 16, 16) < 0.5
    tok[:, 0, 16] = True
    tok[:, 16:32, 0:16] = True
    tok[:, 16:32, 32:48] = True
    tok[0, 32:48, :] = torch.rand(32 - 16, L) < 0.5
    tok[0, 32:48, 0] = True
    out, grads, allowed, lay = run_split(1, Hq, Hq, L, L, 16, tok, (b, b))
    sp = fs.split_layout(lay, L, L)
    assert sp.full is not None and sp.part is not None
    assert (out[0, 1, 32:] == 0).all()
    assert (grads[0][0, 1, 32:] == 0).all()


def _count_parts(monkeypatch):
    made = []

    class Counted(fs.TritonPart):
        def __init__(self, layout, **kw):
            made.append(layout)
            super().__init__(layout, **kw)

    monkeypatch.setattr(fs, "TritonPart", Counted)
    return made


def test_single_part_layouts_launch_one_part(monkeypatch):
    made = _count_parts(monkeypatch)
    keep = torch.rand(2, 3, 3) < 0.7
    keep[:, :, 0] = True
    tok = keep.repeat_interleave(16, 1).repeat_interleave(16, 2)  # block-exact, 48 x 48: no partial part
    lay = run_split(1, 2, 2, 48, 48, 16, tok, (16, 16))[3]
    assert fs.split_layout(lay, 48, 48).part is None
    assert all(m is fs.split_layout(lay, 48, 48).full for m in made) and len(made) == 2  # grad + no-grad call
    made.clear()
    tok = torch.rand(2, 40, 40) < 0.5  # every block partial: no full part
    lay = run_split(1, 2, 2, 40, 40, 16, tok, (16, 16))[3]
    assert fs.split_layout(lay, 40, 40).full is None
    assert len(made) == 2 and all(m is fs.split_layout(lay, 40, 40).part for m in made)


def test_nothing_kept_gives_zeros_and_zero_grads():
    tok = torch.zeros(2, 40, 40, dtype=torch.bool)
    out, grads, _, _ = run_split(1, 2, 2, 40, 40, 16, tok, (16, 16))
    assert (out == 0).all() and all((g == 0).all() for g in grads)


def test_split_equals_single_kernel():
    """The merged result against the single Triton kernel on the whole layout (both token-exact)."""
    torch.manual_seed(3)
    tok = random_tokens(2, 45, 77, (16, 16), density=0.7, device=DEV)
    lay = BlockLayout.from_tokens(tok, (16, 16))
    q = torch.randn(1, 2, 45, 32, device=DEV)
    k, v = torch.randn(2, 1, 2, 77, 32, device=DEV)
    a = fs.split_attention(q, k, v, lay, full="triton", causal=True, q_offset=32)
    b = sparse_attention(q, k, v, lay, causal=True, q_offset=32)
    assert rel(a, b) < tol(torch.float32, 32, 77)


# ----------------------------------------------------------------------------- wiring into backend="flash"
def test_flash_backend_selects_split(monkeypatch):
    """ATTNPRUNE_FA4_PARTIAL / flash.PARTIAL: "split" sends token-exact layouts through the split (here
    with the Triton kernel standing in for FA4's full part, so the whole call runs on the CPU), and
    never calls FA4's masked path; block-exact layouts and "mask_mod" keep the one FA4 call; "triton"
    (the default) runs the whole call on the Triton kernels."""
    from test_backend_flash import _fake_fa4

    calls = _fake_fa4(monkeypatch)
    monkeypatch.setattr(flash, "_mask_mod", lambda *a: ("mask_mod", a))
    monkeypatch.setitem(fs.FULL_PARTS, "fa4", fs.FULL_PARTS["triton"])
    torch.manual_seed(5)
    B = 128
    tok = random_tokens(2, 300, 300, (B, B), density=0.8, device="cpu")
    tok[:, :B, :B] = True  # at least one full block
    token_exact = BlockLayout.from_tokens(tok, B)
    block_exact = BlockLayout.from_blocks(torch.rand(2, 3, 3) < 0.7, B)
    assert token_exact.num_partial > 0
    q, k, v = (torch.randn(1, 2, 300, 16, device=DEV, requires_grad=True) for _ in range(3))
    kp = torch.ones(1, 300, dtype=torch.bool, device=DEV)
    kp[0, 290:] = False

    monkeypatch.setattr(flash, "PARTIAL", "split")
    out = flash.flash_sparse_attention(q, k, v, token_exact, causal=True, key_padding=kp)
    assert not calls, "the split path called FA4's masked attention"
    allowed = allowed_mask(tok.to(DEV), 1, 300, 300, True, 0, kp)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = reference(q64, k64, v64, allowed, 16 ** -0.5)
    assert rel(out, ref) < tol(torch.float32, 16, 300)
    g = torch.autograd.grad(out.sum(), (q, k, v))
    rg = torch.autograd.grad(ref.sum(), (q64, k64, v64))
    assert all(rel(a, b) < tol(torch.float32, 16, 300, grad=True) for a, b in zip(g, rg))

    flash.flash_sparse_attention(q, k, v, block_exact, causal=True)  # no bitmask: FA4 alone, as before
    # (block-exact causal prefill: FA4's native causal masking when NATIVE_CAUSAL, the default, else the mask_mod)
    assert len(calls) == 1 and (calls[-1]["mask_mod"] is None) == flash.NATIVE_CAUSAL == calls[-1]["causal"]
    monkeypatch.setattr(flash, "PARTIAL", "mask_mod")
    flash.flash_sparse_attention(q, k, v, token_exact, causal=True)
    assert len(calls) == 2 and calls[-1]["mask_mod"] is not None
    monkeypatch.setattr(flash, "PARTIAL", "triton")  # the default: the whole call on the Triton kernels
    got = flash.flash_sparse_attention(q, k, v, token_exact, causal=True, key_padding=kp)
    assert len(calls) == 2
    assert torch.equal(got, sparse_attention(q, k, v, token_exact, causal=True, key_padding=kp))
    monkeypatch.setattr(flash, "PARTIAL", "bogus")
    with pytest.raises(InvalidArgumentError, match="ATTNPRUNE_FA4_PARTIAL"):
        flash.flash_sparse_attention(q, k, v, token_exact)


def test_partial_mode_from_environment():
    code = "import attnprune.backends.flash as f; print(f.PARTIAL)"
    env = {**os.environ, "ATTNPRUNE_FA4_PARTIAL": "split"}
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert got.stdout.strip() == "split"
    env.pop("ATTNPRUNE_FA4_PARTIAL")
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert got.stdout.strip() == "triton"


# ----------------------------------------------------------------------------- FA4Full's glue, on an emulated FA4
@pytest.mark.parametrize("case", ["gqa", "padding_bool", "padding_lengths", "causal_offset"])
def test_fa4_full_part_on_emulated_fa4(monkeypatch, case):
    """The FA4 full part (metadata, key-padding mask_mod, transposes, lse convention, backward with the
    merged out / lse) against float64, FA4 emulated by its documented contract (CPU)."""
    from fa4_emulator import emulated_fa4

    emulated_fa4(monkeypatch, flash)
    B, Hq, Hkv, Lq, Lk, D, causal, off, kp, block = CASES[case]
    torch.manual_seed(11 + len(case))
    tok = random_tokens(Hq, Lq, Lk, block, density=0.8, device="cpu")
    key_padding = None
    if kp == "bool":
        key_padding = torch.ones(B, Lk, dtype=torch.bool)
        key_padding[1, 50:] = False
        key_padding[0, :16] = False
    elif kp == "lengths":
        key_padding = torch.tensor([64, 17, 40])
    key_padding = None if key_padding is None else key_padding.to(DEV)
    _, _, _, lay = run_split(B, Hq, Hkv, Lq, Lk, D, tok, block, causal=causal, q_offset=off,
                             key_padding=key_padding, full="fa4")
    assert fs.split_layout(lay, Lq, Lk, causal, off).full is not None


# ----------------------------------------------------------------------------- on the GPU, FA4 as the full part
def _fa4_ok():
    from attnprune import backends

    if not HAS_CUDA or torch.cuda.get_device_capability() < (9, 0):
        return False
    return backends._importable("flash_attn.cute")


@pytest.mark.gpu
@pytest.mark.skipif(not _fa4_ok(), reason="needs an sm90+ GPU with FlashAttention-4")
@pytest.mark.parametrize("case", ["odd", "gqa", "causal_offset", "padding_bool", "empty"])
def test_split_with_fa4_matches_float64(case):
    torch.manual_seed(1)
    B, Hq, Hkv, D, Lq, Lk, causal, off, kp = 2, 4, 4, 64, 333, 333, False, 0, None
    if case == "gqa":
        Hkv, D, Lq, Lk = 2, 128, 260, 517
    if case == "causal_offset":
        Lq, Lk, causal, off = 200, 517, True, 317
    if case == "padding_bool":
        causal, off = True, 0
        kp = torch.ones(B, Lk, dtype=torch.bool, device=DEV)
        kp[1, 200:] = False
    tok = random_tokens(Hq, Lq, Lk, (128, 128), density=0.8, device="cpu")
    tok[:, :128, :128] = True
    if case == "empty":
        tok[1, :140] = False
    run_split(B, Hq, Hkv, Lq, Lk, D, tok, (128, 128), causal=causal, q_offset=off, key_padding=kp,
              dtype=torch.bfloat16, full="fa4")
