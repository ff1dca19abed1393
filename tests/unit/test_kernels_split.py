"""The split dK/dV backward (long kv-block columns cut into chunks, :mod:`attnprune.kernels._split`).

Plan tests check the chunk tables (the sink column of a real-mask-shaped layout is split, no chunk
is longer than the cap, the chunks of a tile cover its work list exactly once). Kernel tests run
layouts whose sink column is long enough to be split (``MIN_CHUNK`` lowered to 2 so that it
happens at interpreter sizes), check that the split kernel really ran, and compare dQ/dK/dV with
the float64 reference of ``test_kernels``.

Tolerances: against float64, ``test_kernels.TOL`` (the split only changes the order in which fp32
partial sums of one dK/dV tile are added: ``n_chunks`` more roundings of ``2**-24`` each, far below
it). Split against unsplit in the same dtype: fp32 sums in another order differ by a few fp32 ulps of
the accumulated magnitude, and one final rounding to ``dtype`` can then differ by one ulp of it, so
the relative norm difference is bounded by ``eps(dtype)`` (``64 * eps(fp32)`` for fp32).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from attnprune.kernels import BlockLayout, KernelConfig, _split, _triton_bwd, sparse_attention  # noqa: E402

from test_kernels import DEV, DTYPES, random_tokens, rel, run_case  # noqa: E402

if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)


def sink_band(H, qb, kb, band=2, sink=True):
    """bool [H, qb, kb]: key block 0 in every row (the sink) plus a band of ``band`` blocks ending at
    the (scaled) diagonal: the shape of a real AP mask."""
    keep = torch.zeros(H, qb, kb, dtype=torch.bool)
    for i in range(qb):
        d = min(kb - 1, (i * kb) // qb)
        keep[:, i, max(0, d - band + 1):d + 1] = True
    keep[:, :, 0] = sink
    return keep


class _Counter:
    """Stands in for a Triton kernel: counts ``kernel[grid]`` launches and forwards them."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, 0

    def __getitem__(self, grid):
        self.calls += 1
        return self.kernel[grid]


@pytest.fixture
def split_on(monkeypatch):
    """MIN_CHUNK = 2 (split at interpreter sizes), split enabled, items-kernel launches counted."""
    monkeypatch.setattr(_split, "MIN_CHUNK", 2)
    monkeypatch.setenv("ATTNPRUNE_DKDV_SPLIT", "1")
    counter = _Counter(_triton_bwd._dkdv_items_kernel)
    monkeypatch.setattr(_triton_bwd, "_dkdv_items_kernel", counter)
    return counter


def check_table(sp):
    """Every tile's items cover [0, W) exactly once; a tile is split iff W > threshold, into chunks
    <= cap; slots contiguous per split tile."""
    items = sp.items.cpu().tolist()
    assert len(items) == sp.n_items == sp.work.numel()  + int((sp.chunks - 1).sum())
    lengths = [u1 - u0 for _, _, u0, u1, _ in items]
    assert lengths == sorted(lengths, reverse=True)  # longest first
    per_tile = {}
    for th, kb, u0, u1, slot in items:
        per_tile.setdefault((th, kb), []).append((u0, u1, slot))
    red = {(th, kb): (s0, n) for th, kb, s0, n in sp.reduce.cpu().tolist()}
    assert len(red) == sp.n_split and sum(n for _, n in red.values()) == sp.n_slots
    for (th, kb), parts in per_tile.items():
        parts.sort()
        w = int(sp.work[th, kb])
        assert parts[0][0] == 0 and parts[-1][1] == w
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
        if len(parts) == 1:
            assert parts[0][2] == -1 and w <= sp.threshold and (th, kb) not in red
        else:
            assert w > sp.threshold and all(u1 - u0 <= sp.cap and u1 > u0 for u0, u1, _ in parts)
            s0, n = red[(th, kb)]
            assert n == len(parts) == int(sp.chunks[th, kb])
            assert [s for _, _, s in parts] == list(range(s0, s0 + n))


# ----------------------------------------------------------------------------- plan
@pytest.mark.parametrize("layout_heads", [9, 1])
def test_plan_splits_sink_column_real_shape(layout_heads):
    # the shape: 8k tokens, 128-token blocks, 9 query heads on 3 kv heads; default constants
    keep = sink_band(layout_heads, 64, 64, band=5)
    lay = BlockLayout.from_blocks(keep, (128, 128))
    sp = lay.dkdv_split(8192, 8192, True, 0, 9, 3)
    assert sp is not None
    th_n = 3 if layout_heads == 9 else 1
    assert sp.work.shape == (th_n, 64) and sp.hg == 3 // th_n
    mean = sp.work[sp.work > 0].double().mean().item()
    assert sp.threshold == max(_split.MIN_CHUNK, math.ceil(_split.FACTOR * mean))
    assert sp.cap == min(sp.threshold, max(_split.MIN_CHUNK, math.ceil(_split.CHUNK_FACTOR * mean)))
    assert (sp.work[:, 0] == 3 * 64).all()  # the sink tile walks all 64 query blocks of 3 heads
    assert (sp.chunks[:, 0] > 1).all() and (sp.chunks[:, 1:] == 1).all()
    longest = max(u1 - u0 for _, _, u0, u1, _ in sp.items.tolist())
    assert longest <= max(sp.cap, int(sp.work[:, 1:].max())) and sp.cap < 3 * 64
    check_table(sp)
    assert lay.dkdv_split(8192, 8192, True, 0, 9, 3) is sp  # cached with the plan


def test_plan_without_long_columns_is_not_split():
    band = sink_band(4, 16, 16, band=3, sink=False)
    lay = BlockLayout.from_blocks(band, (16, 16))
    assert lay.dkdv_split(256, 256, True, 0, 4, 2) is None
    assert BlockLayout.from_blocks(torch.zeros(2, 4, 4, dtype=torch.bool), (16, 16)).dkdv_split(
        64, 64, False, 0, 2, 2) is None  # nothing kept at all


def test_plan_split_table_with_empty_columns_and_cut_lengths(monkeypatch):
    monkeypatch.setattr(_split, "MIN_CHUNK", 2)
    keep = sink_band(4, 12, 10, band=1)
    keep[1, :, 3:5] = False  # empty columns for one head
    lay = BlockLayout.from_blocks(keep, (16, 16))
    for lq, lk, causal in [(190, 157, False), (150, 150, True), (17, 160, False)]:
        sp = lay.dkdv_split(lq, lk, causal, 0, 4, 2)
        if sp is not None:
            check_table(sp)
    sp = lay.dkdv_split(190, 157, False, 0, 4, 2)
    assert sp is not None and (sp.chunks[:, 0] > 1).all()


# ----------------------------------------------------------------------------- kernels
def _split_of(lay, Lq, Lk, causal, Hq, Hkv):
    sp = lay.dkdv_split(Lq, Lk, causal, 0, Hq, Hkv)
    assert sp is not None and sp.n_split > 0 and int(sp.chunks.max()) > 1
    return sp


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
def test_sink_band_gqa_per_head_layout(split_on, dtype, causal):
    Hq, Hkv, L, D = 4, 2, 200, 16  # 200 = 12.5 blocks: the last block is cut
    lay = BlockLayout.from_blocks(sink_band(Hq, 13, 13).to(DEV), (16, 16))
    sp = _split_of(lay, L, L, causal, Hq, Hkv)
    assert sp.tile_heads == Hkv and sp.hg == 1
    run_case(2, Hq, Hkv, L, L, D, lay, lay.to_dense(L, L), dtype=dtype, causal=causal)
    assert split_on.calls == 1


def test_sink_band_shared_layout_rectangular_odd_lengths(split_on):
    Hq, Hkv, Lq, Lk, D = 3, 1, 150, 170, 16  # one layout for all heads, G = 3, cross-attention shape
    lay = BlockLayout.from_blocks(sink_band(1, 10, 11).to(DEV), (16, 16))
    sp = _split_of(lay, Lq, Lk, False, Hq, Hkv)
    assert sp.tile_heads == 1 and sp.hg == Hkv
    run_case(2, Hq, Hkv, Lq, Lk, D, lay, lay.to_dense(Lq, Lk))
    assert split_on.calls == 1


def test_token_mask_key_padding_empty_rows_and_columns(split_on):
    Hq, Hkv, L, D = 2, 1, 160, 16
    keep = sink_band(Hq, 10, 10, band=2)
    keep[1, :, 4:6] = False  # empty key columns in head 1
    tok = keep.repeat_interleave(16, 1).repeat_interleave(16, 2) & (torch.rand(Hq, L, L) < 0.8)  # partial blocks
    tok[0, 37] = False  # an empty query row
    tok[1, 64:80] = False  # an empty query block
    tok = tok.to(DEV)
    lay = BlockLayout.from_tokens(tok, (16, 16))
    assert lay.num_partial > 0
    _split_of(lay, L, L, True, Hq, Hkv)
    lens = torch.tensor([160, 5], device=DEV)  # batch 1 keeps only the first 5 keys
    out, (dq, dk, dv), _ = run_case(2, Hq, Hkv, L, L, D, lay, tok, causal=True, key_padding=lens)
    assert (dq[0, 0, 37] == 0).all() and (dq[0, 1, 64:80] == 0).all()
    assert (dk[1, :, 5:] == 0).all() and (dv[1, :, 5:] == 0).all()
    assert split_on.calls == 1


def test_kernel_tiles_smaller_than_layout_blocks(split_on):
    # 32x32 layout blocks on 16x16 kernel tiles: two sub-tiles per item; Lk = 170 leaves the last
    # block's second sub-tile wholly past the keys
    Hq, Hkv, Lq, Lk, D = 2, 1, 180, 170, 16
    lay = BlockLayout.from_blocks(sink_band(Hq, 6, 6, band=1).to(DEV), (32, 32))
    _split_of(lay, Lq, Lk, True, Hq, Hkv)
    cfg = {"fwd": KernelConfig(16, 16), "dq": KernelConfig(16, 16), "dkdv": KernelConfig(16, 16)}
    run_case(1, Hq, Hkv, Lq, Lk, D, lay, lay.to_dense(Lq, Lk), configs=cfg, causal=True, q_offset=5)
    pre = KernelConfig(16, 16, 4, 1, False, True)
    run_case(1, Hq, Hkv, Lq, Lk, D, lay, lay.to_dense(Lq, Lk), configs={**cfg, "dkdv": pre})
    assert split_on.calls == 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_matches_unsplit_and_is_deterministic(split_on, monkeypatch, dtype):
    Hq, Hkv, L, D = 4, 2, 176, 16
    lay = BlockLayout.from_blocks(sink_band(Hq, 11, 11).to(DEV), (16, 16))
    _split_of(lay, L, L, True, Hq, Hkv)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, Hq, L, D, generator=gen).to(DEV, dtype).requires_grad_()
    k = torch.randn(1, Hkv, L, D, generator=gen).to(DEV, dtype).requires_grad_()
    v = torch.randn(1, Hkv, L, D, generator=gen).to(DEV, dtype).requires_grad_()
    go = torch.randn(1, Hq, L, D, generator=gen).to(DEV, dtype)

    def grads():
        return torch.autograd.grad(sparse_attention(q, k, v, lay, causal=True), (q, k, v), go)

    split1, split2 = grads(), grads()
    assert split_on.calls == 2
    monkeypatch.setenv("ATTNPRUNE_DKDV_SPLIT", "0")
    plain = grads()
    assert split_on.calls == 2  # the switch really turns the split off
    tol = 64 * torch.finfo(torch.float32).eps if dtype == torch.float32 else torch.finfo(dtype).eps
    for a, b, c in zip(split1, split2, plain):
        assert torch.equal(a, b)  # fixed reduction order: bitwise reproducible
        assert rel(a, c) <= tol, rel(a, c)


def test_random_layout_gqa_still_exact_when_split(split_on):
    # random blocks plus a sink: a layout the split handles next to the synthetic-mask case
    Hq, Hkv, L, D = 4, 2, 144, 16
    tok = random_tokens(Hq, L, L, (16, 16), density=0.3)
    tok[:, :, :16] = True
    lay = BlockLayout.from_tokens(tok, (16, 16))
    _split_of(lay, L, L, False, Hq, Hkv)
    run_case(1, Hq, Hkv, L, L, D, lay, tok)
    assert split_on.calls == 1
