"""Token-exact masks at block speed, the second way (issue 9): FA4 on the full blocks, Triton on the rest.

The flash backend's default for a layout with token-exact (bitmask) blocks hands FA4 a ``mask_mod``
that reads the bitmask; on sm90 that ``mask_mod`` runs per element, and with 20% partial blocks the call
took 1.30-1.85x the block-exact time on an H200. Here the kept entries of one call are split, once per
layout and shape (:func:`split_layout`, cached on the layout), into two disjoint sets of whole blocks:

* the **full part**: the blocks :func:`~attnprune.backends.flash.fa4_block_tables` calls "full" (kept
  entirely, wholly inside the causal past, not holding the end of the keys): FA4 runs them block-exact,
  without any ``mask_mod`` (:class:`FA4Full`);
* the **partial part**: every other kept block (bitmask blocks, causal-diagonal blocks, the block holding
  the end of the keys), with its bitmask: the project's Triton kernel runs them (:class:`TritonPart`),
  masking per element only there.

Key padding (per batch element) is applied by both parts to their own blocks: the Triton kernel masks
padded keys wherever it runs; FA4 gets, per batch element, its full blocks touched by padding in its
"mask" lists with a ``mask_mod`` reading only the key padding, and drops the blocks without any real key
(:func:`~attnprune.backends.flash.fa4_metadata`). So the split itself never depends on the padding (no
host read, one cached split per layout and shape) and every (query, key) entry is counted in exactly one
part. Moving padded blocks to the Triton part instead would make the split depend on the padding.

The two results merge exactly through the log-sum-exp (natural log, scale included, FA4's convention;
the Triton kernel's ``lse2 = lse * log2(e)`` with ``+inf`` for empty rows is converted)::

    lse = logaddexp(lse1, lse2);   o = o1 * exp(lse1 - lse) + o2 * exp(lse2 - lse)

A row empty in one part has ``lse = -inf`` and ``o = 0`` there (weight 0); a row empty in both is 0 with
``lse = -inf`` and zero gradients, as in the other backends. Backward (exact): attention's backward needs
only ``P = exp(s - lse)`` with the merged ``lse`` and ``delta = rowsum(dO * O)`` with the merged ``O``, so
each part runs its own backward with the merged ``o``, ``lse`` and the incoming ``dO`` on its own blocks,
and ``dq = dq1 + dq2`` (likewise ``dk``, ``dv``). When one part is empty the other runs alone (no merge,
no extra launch).

The full part is pluggable (:data:`FULL_PARTS`): ``"fa4"`` on the GPU, ``"triton"`` (the Triton kernel on
the full-only layout, unmasked but for key padding, as FA4 would run it) for tests on the CPU.
Chosen by ``ATTNPRUNE_FA4_PARTIAL=split`` in :mod:`attnprune.backends.flash`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..kernels import BlockLayout, _split
from ..kernels.attention import (
    _backward,
    _check_inputs,
    _forward,
    _layout_on,
    _padded_call,
    _placeholder,
)

__all__ = ["SplitLayout", "split_layout", "split_attention", "merge", "merge_fused", "TritonPart", "FA4Full",
           "FULL_PARTS"]

_LN2 = math.log(2.0)
_LOG2E = 1.0 / _LN2


@dataclass(frozen=True)
class SplitLayout:
    """The two disjoint sub-layouts of one call (grid ``[H, ceil(lq/bq), ceil(lk/bk)]``, the layout's
    block and heads); None where a part has no block. ``full``: whole blocks needing no mask at all
    (FA4, no ``mask_mod``); ``part``: every other kept block, bitmasks re-indexed (Triton, with
    causality, key bounds and bitmasks). ``n_full``, ``n_part``: their block counts (over heads)."""

    full: BlockLayout | None
    part: BlockLayout | None
    n_full: int
    n_part: int


def split_layout(layout: BlockLayout, lq: int, lk: int, causal: bool = False, q_offset: int = 0) -> SplitLayout:
    """Split ``layout`` for queries ``0..lq`` and keys ``0..lk`` (cached on the layout, like
    :func:`~attnprune.backends.flash.fa4_block_tables`, whose (full, part) tables it follows)."""
    from .flash import fa4_block_tables

    key = ("fa4_split", int(lq), int(lk), bool(causal), int(q_offset) if causal else 0)
    hit = layout._cache.get(key)
    if hit is not None:
        return hit
    full, part = fa4_block_tables(layout, lq, lk, causal, q_offset)  # bool [H, qn, kn], disjoint
    h, qn, kn = full.shape
    n_full, n_part = int(full.sum()), int(part.sum())
    full_l = BlockLayout.from_blocks(full, layout.block, q_len=lq, k_len=lk) if n_full else None
    part_l = None
    if n_part:
        codes = layout.code_table()[:, :qn, :kn]
        idx = part.nonzero()  # sorted by (h, qb, kb), the order BlockLayout stores
        code = codes[idx[:, 0], idx[:, 1], idx[:, 2]]
        used = code >= 0
        new_code = torch.full_like(code, -1)
        new_code[used] = torch.arange(int(used.sum()), dtype=torch.int32, device=code.device)
        bits = layout.bits[code[used].long()].contiguous()
        part_l = BlockLayout(h, qn, kn, layout.block, (idx[:, 0] * qn + idx[:, 1]).contiguous(),
                             idx[:, 2].to(torch.int32).contiguous(), new_code.contiguous(), bits, lq, lk)
    out = SplitLayout(full_l, part_l, n_full, n_part)
    layout._cache[key] = out
    return out


def _to_natural(lse2: torch.Tensor) -> torch.Tensor:
    """The Triton kernel's ``lse2`` (log2, ``+inf`` for an empty row) -> natural log, ``-inf`` for empty."""
    return torch.where(lse2 == math.inf, -math.inf, lse2 * _LN2)


def _to_log2(lse: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_to_natural`."""
    return torch.where(lse == -math.inf, math.inf, lse * _LOG2E)


def merge(o1, lse1, o2, lse2):
    """Exact merge of two attentions over disjoint key sets.

    o1, o2: ``[B, H, L, Dv]``; lse1, lse2: float32 ``[B, H, L]`` natural log (``-inf``: empty row, its
    ``o`` is 0). Returns ``(o [B, H, L, Dv] in o1's dtype, lse float32 [B, H, L])``; a row empty in both
    is 0 with ``lse = -inf`` (no NaN). The weights are computed in float32. (The reference form; the
    calls use :func:`merge_fused`.)
    """
    lse = torch.logaddexp(lse1, lse2)
    ref = torch.where(lse == -math.inf, 0.0, lse)  # both empty: exp(-inf - 0) = 0, not exp(nan)
    w1 = torch.exp(lse1 - ref)[..., None]
    w2 = torch.exp(lse2 - ref)[..., None]
    o = torch.addcmul(o1.float() * w1, o2.float(), w2)
    return o.to(o1.dtype), lse


@functools.cache
def _merge_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def merge_kernel(O1, L1, O2, L2, O, L, s1b, s1h, s1m, s1d, s2b, s2h, s2m, s2d, sob, soh, som, sod, H, Lq,
                     BLOCK_M: tl.constexpr, DV: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, DV)
        rows = offs_m < Lq
        l1 = tl.load(L1 + bh.to(tl.int64) * Lq + offs_m, mask=rows, other=float("-inf"))
        l2 = tl.load(L2 + bh.to(tl.int64) * Lq + offs_m, mask=rows, other=float("-inf"))
        m = tl.maximum(l1, l2)
        empty = m == float("-inf")
        m = tl.where(empty, 0.0, m)  # both empty: exp(-inf - 0) = 0, no nan
        e1 = tl.exp(l1 - m)
        e2 = tl.exp(l2 - m)
        tot = e1 + e2  # >= 1 unless empty
        tot_safe = tl.where(empty, 1.0, tot)
        w1 = e1 / tot_safe
        w2 = e2 / tot_safe
        tl.store(L + bh.to(tl.int64) * Lq + offs_m, tl.where(empty, float("-inf"), m + tl.log(tot_safe)), mask=rows)
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        m2 = rows[:, None]
        o1 = tl.load(O1 + b64 * s1b + h64 * s1h + offs_m[:, None] * s1m + offs_d[None, :] * s1d, mask=m2, other=0.0)
        o2 = tl.load(O2 + b64 * s2b + h64 * s2h + offs_m[:, None] * s2m + offs_d[None, :] * s2d, mask=m2, other=0.0)
        o = o1.to(tl.float32) * w1[:, None] + o2.to(tl.float32) * w2[:, None]
        tl.store(O + b64 * sob + h64 * soh + offs_m[:, None] * som + offs_d[None, :] * sod, o.to(O.dtype.element_ty),
                 mask=m2)

    return merge_kernel


def merge_fused(o1, lse1, o2, lse2):
    """:func:`merge` in one Triton launch (reads ``o1``, ``o2`` once, any strides; head dim a power of two).
    The merged ``o`` is laid out ``[B, L, H, Dv]`` in memory (returned as the ``[B, H, L, Dv]`` view), the
    layout FA4's backward reads without a copy."""
    B, H, L, DV = o1.shape
    o = torch.empty(B, L, H, DV, dtype=o1.dtype, device=o1.device).transpose(1, 2)
    lse = torch.empty(B, H, L, dtype=torch.float32, device=o1.device)
    bm = 64 if DV <= 64 else 32
    _merge_kernel()[(-(-L // bm), B * H)](o1, lse1.contiguous(), o2, lse2.contiguous(), o, lse, *o1.stride(),
                                         *o2.stride(), *o.stride(), H, L, BLOCK_M=bm, DV=DV, num_warps=4)
    return o, lse


class TritonPart:
    """One part run by the project's Triton kernels on ``layout``.

    ``forward(q, k, v) -> (o [B, Hq, Lq, Dv], lse float32 [B, Hq, Lq] natural, -inf if empty)``;
    ``backward(do, q, k, v, o, lse) -> (dq, dk, dv)`` with ``o``, ``lse`` the merged ones.
    q: ``[B, Hq, Lq, D]``, k/v: ``[B, Hkv, Lk, D|Dv]`` (head dims powers of two, as after ``_padded_call``);
    kpm: int8 ``[B, Lk]`` or None.
    """

    def __init__(self, layout: BlockLayout, *, lq: int, lk: int, causal: bool, q_offset: int, kpm, scale: float,
                 q_heads: int, kv_heads: int, grad: bool):
        self.layout, self.causal, self.q_offset = layout, bool(causal), int(q_offset)
        self.kpm, self.scale = kpm, scale
        self.plan = layout.plan(lq, lk, causal, q_offset)
        self.split = (layout.dkdv_split(lq, lk, causal, q_offset, q_heads, kv_heads)
                      if grad and _split.split_enabled() else None)

    def forward(self, q, k, v):
        o, lse2, _, _ = _forward(q, k, v, self.kpm, self.layout, self.plan, self.scale, self.causal, self.q_offset,
                                 None)
        return o, _to_natural(lse2)

    def backward(self, do, q, k, v, o, lse):
        dev = q.device
        kpm_t = self.kpm if self.kpm is not None else _placeholder(dev, torch.int8, 0)
        bits = self.layout.bits if self.layout.num_partial else _placeholder(dev, torch.int32, -1)
        return _backward(do, q, k, v, o, _to_log2(lse).contiguous(), kpm_t, bits, self.layout, self.plan, self.scale,
                         self.causal, self.q_offset, self.kpm is not None, {}, self.split)[:3]


def _triton_full(layout: BlockLayout, **kw) -> TritonPart:
    """The full part on the Triton kernel (tests on the CPU): the full-only layout needs no causal mask
    (its blocks lie wholly in the causal past), so it runs with ``causal=False``, as FA4 does."""
    return TritonPart(layout, **{**kw, "causal": False, "q_offset": 0})


class FA4Full:
    """The full part on FlashAttention-4 (block sparsity, ``mask_mod`` only for key padding on the blocks
    it touches). Same ``forward`` / ``backward`` contract as :class:`TritonPart`; q, k, v are transposed
    to FA4's ``[B, L, H, D]`` for the call. Uses ``flash_attn.cute.interface._flash_attn_fwd`` (with
    ``return_lse``) and ``_flash_attn_bwd`` (given ``out`` and ``lse``), as ``FlashAttnFunc`` does
    (flash-attn-4 4.0.0b36)."""

    def __init__(self, layout: BlockLayout, *, lq: int, lk: int, causal: bool, q_offset: int, kpm, scale: float,
                 q_heads: int, kv_heads: int, grad: bool):
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

        from . import flash

        kp = kpm.bool() if kpm is not None else None
        meta = flash.fa4_metadata(layout, lq, lk, causal=False, key_padding=kp)
        self.fwd_meta = BlockSparseTensorsTorch(*meta["fwd"], block_size=tuple(layout.block))
        self.bwd_meta = BlockSparseTensorsTorch(*meta["bwd"], block_size=tuple(layout.block))
        self.mask_mod, self.aux = (flash._mask_args(layout, lq, lk, False, 0, kp, False) if kp is not None
                                   else (None, None))
        self.scale, self.pack_gqa = scale, flash.PACK_GQA

    def forward(self, q, k, v):
        from flash_attn.cute.interface import _flash_attn_fwd

        res = _flash_attn_fwd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=self.scale,
                              causal=False, pack_gqa=self.pack_gqa, mask_mod=self.mask_mod, aux_tensors=self.aux,
                              block_sparse_tensors=self.fwd_meta, return_lse=True)
        return res[0].transpose(1, 2), res[1]

    def backward(self, do, q, k, v, o, lse):
        from flash_attn.cute.interface import _flash_attn_bwd

        t = [x.transpose(1, 2) for x in (q, k, v, o, do)]
        res = _flash_attn_bwd(t[0], t[1], t[2], t[3], t[4], lse.contiguous(), softmax_scale=self.scale, causal=False,
                              pack_gqa=self.pack_gqa, mask_mod=self.mask_mod, aux_tensors=self.aux,
                              block_sparse_tensors=self.bwd_meta)
        return tuple(g.transpose(1, 2) for g in res[:3])


# name -> factory(full_only_layout, lq=, lk=, causal=, q_offset=, kpm=, scale=, q_heads=, kv_heads=, grad=)
FULL_PARTS = {"fa4": FA4Full, "triton": _triton_full}


def _run_parts(parts, q, k, v):
    """Forward of the parts, merged: ``(o, lse)``; one part alone is returned as it is."""
    o, lse = parts[0].forward(q, k, v)
    for p in parts[1:]:
        o, lse = merge_fused(o, lse, *p.forward(q, k, v))
    return o, lse


class _SplitAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, parts):
        o, lse = _run_parts(parts, q, k, v)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.parts = parts
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = ctx.parts[0].backward(do, q, k, v, o, lse)
        for p in ctx.parts[1:]:
            g = p.backward(do, q, k, v, o, lse)
            dq, dk, dv = dq.add_(g[0]), dk.add_(g[1]), dv.add_(g[2])
        return dq, dk, dv, None


def split_attention(q, k, v, layout: BlockLayout, *, causal: bool = False, scale: float | None = None,
                    key_padding: torch.Tensor | None = None, q_offset: int = 0, full="fa4") -> torch.Tensor:
    """Masked attention on ``layout`` as the full part (``full``: a :data:`FULL_PARTS` name or factory)
    plus the Triton kernel on the other kept blocks, merged exactly; differentiable.

    Same contract as :func:`attnprune.kernels.sparse_attention`: q ``[B, Hq, Lq, D]``, k ``[B, Hkv, Lk, D]``,
    v ``[B, Hkv, Lk, Dv]`` -> ``[B, Hq, Lq, Dv]``; key_padding bool ``[B, Lk]`` (True = real key) or int
    lengths ``[B]``; a query row with no allowed key is 0 with zero gradients.
    """
    _check_inputs(q, k, v)
    make_full = FULL_PARTS[full] if isinstance(full, str) else full

    def run(q, k, v, kpm, scale):
        lay = _layout_on(layout, q.device)
        Lq, Lk = q.shape[2], k.shape[2]
        sp = split_layout(lay, Lq, Lk, causal, q_offset)
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        kw = dict(lq=Lq, lk=Lk, causal=bool(causal), q_offset=int(q_offset), kpm=kpm, scale=scale,
                  q_heads=q.shape[1], kv_heads=k.shape[1], grad=grad)
        parts = ([make_full(sp.full, **kw)] if sp.full is not None else []) + \
                ([TritonPart(sp.part, **kw)] if sp.part is not None else [])
        if not parts:  # nothing kept in range: the Triton kernel on the layout gives zeros and zero gradients
            parts = [TritonPart(lay, **kw)]
        if grad:
            return _SplitAttention.apply(q, k, v, parts)
        return _run_parts(parts, q, k, v)[0]

    return _padded_call(q, k, v, scale, key_padding, run)
