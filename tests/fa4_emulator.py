"""A float64 stand-in for FlashAttention-4's forward / backward entry points, for CPU tests of the glue
around them (tests/unit/test_flash_split.py): FA4's contract as read from flash-attn-4 4.0.0b36's
``flash_attn/cute/interface.py`` and ``softmax.py``, not its kernels."""

from __future__ import annotations

import math
import sys
import types

import torch


def emulated_fa4(monkeypatch, flash, full_part_only=True):
    """Stand-ins for ``flash_attn.cute.interface._flash_attn_fwd`` / ``_flash_attn_bwd`` (and
    ``flash_attn.cute.flash_attn_func``: the two as an autograd Function) with the contract
    read from flash-attn-4 4.0.0b36: tensors ``[B, L, H, D]``, block-sparse lists ``(mask_cnt, mask_idx,
    full_cnt, full_idx)`` (blocks of the full lists run unmasked, those of the mask lists through the
    ``mask_mod``), ``lse`` ``[B, H, Lq]`` natural log with the scale, ``-inf`` and ``o = 0`` for an empty
    row; the backward recomputes ``P = exp(s - lse)`` on its (transposed) lists with the given ``out`` and
    ``lse``. Computed densely in float64; the mask_mod is read from its aux tensors (key padding only)."""

    class BlockSparseTensorsTorch:
        def __init__(self, *tensors, block_size):
            self.tensors, self.block_size = tensors, block_size

    def table(cnt, idx, n):  # lists -> bool [B|1, H, A, n]
        valid = torch.arange(idx.shape[-1], device=idx.device) < cnt[..., None].long()
        out = torch.zeros(*idx.shape[:-1], n + 1, dtype=torch.bool, device=idx.device)  # column n: where the unused entries go
        return out.scatter_(-1, torch.where(valid, idx.long(), n), True)[..., :n]

    def mod_ok(mask_mod, aux, B, Lq, Lk):  # bool [B, H|1, Lq, Lk]: the mask_mod's verdict per element
        has_bits, causal, has_kp, shared, bq, bk = mask_mod[1]
        if full_part_only:
            assert not has_bits and not causal and has_kp  # the full part masks key padding only
        params, codes, bits, kp = aux
        i = torch.arange(Lq, device=params.device)[:, None]
        j = torch.arange(Lk, device=params.device)[None, :]
        ok = (j < int(params[1]))[None, None]
        if causal:
            ok = ok & (j <= i + int(params[0]))[None, None]
        if has_bits:
            code = codes[:, i // bq, j // bk].long()  # [H|1, Lq, Lk]
            word = bits[code.clamp_min(0), i % bq, (j % bk) // 32]
            bit = ((word >> (j % 32)) & 1) == 1
            ok = ok & ((code == -1) | ((code >= 0) & bit))[None]
        if has_kp:
            ok = ok & (kp[:, None, None, :Lk] != 0)
        return ok

    def allowed(bst, mask_mod, aux, B, Lq, Lk, transposed, causal):
        bq, bk = bst.block_size
        qn, kn = -(-Lq // bq), -(-Lk // bk)
        a, c = (kn, qn) if transposed else (qn, kn)
        mc, mi, fc, fi = bst.tensors
        mt, ft = table(mc, mi, c), table(fc, fi, c)
        if transposed:
            mt, ft = mt.transpose(-1, -2), ft.transpose(-1, -2)
        assert not (mt & ft).any()

        def tok(t):
            return t.repeat_interleave(bq, -2).repeat_interleave(bk, -1)[..., :Lq, :Lk]

        m = tok(mt)
        if mask_mod is not None:
            m = m & mod_ok(mask_mod, aux, B, Lq, Lk)
        elif causal:
            i = torch.arange(Lq, device=m.device)[:, None]
            m = m & (torch.arange(Lk, device=m.device)[None, :] <= i + Lk - Lq)
        return (tok(ft) | m).expand(B, -1, -1, -1)

    def scores(q, k, scale):
        G = q.shape[2] // k.shape[2]
        return torch.einsum("bihd,bjhd->bhij", q.double(), k.double().repeat_interleave(G, 2)) * scale, G

    def fwd(q, k, v, *, softmax_scale, causal, pack_gqa, mask_mod, aux_tensors, block_sparse_tensors, return_lse):
        assert return_lse and not (causal and mask_mod is not None)  # FA4 ignores causal= with a mask_mod
        assert not (full_part_only and causal)
        B, Lq, H, _ = q.shape
        s, G = scores(q, k, softmax_scale)
        ok = allowed(block_sparse_tensors, mask_mod, aux_tensors, B, Lq, k.shape[1], False, causal)
        s = s.masked_fill(~ok, -math.inf)
        lse = torch.logsumexp(s, -1)
        p = torch.exp(s - torch.where(lse == -math.inf, 0.0, lse)[..., None])
        o = torch.einsum("bhij,bjhd->bihd", p, v.double().repeat_interleave(G, 2))
        return o.to(q.dtype), lse.float(), None, None, None

    def bwd(q, k, v, out, dout, lse, *, softmax_scale, causal, pack_gqa, mask_mod, aux_tensors,
            block_sparse_tensors):
        assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
        assert not (full_part_only and causal)
        B, Lq, H, _ = q.shape
        s, G = scores(q, k, softmax_scale)
        ok = allowed(block_sparse_tensors, mask_mod, aux_tensors, B, Lq, k.shape[1], True, causal)
        p = torch.where(ok, torch.exp(s - lse.double()[..., None]), 0.0)
        do = dout.double()
        vv = v.double().repeat_interleave(G, 2)
        dp = torch.einsum("bihd,bjhd->bhij", do, vv)
        delta = (do * out.double()).sum(-1).transpose(1, 2)[..., None]
        ds = p * (dp - delta) * softmax_scale
        dq = torch.einsum("bhij,bjhd->bihd", ds, k.double().repeat_interleave(G, 2))
        dk = torch.einsum("bhij,bihd->bjhd", ds, q.double())
        dv = torch.einsum("bhij,bihd->bjhd", p, do)
        Bk, Lk, Hk = k.shape[:3]
        dk = dk.reshape(Bk, Lk, Hk, G, -1).sum(3)
        dv = dv.reshape(Bk, Lk, Hk, G, -1).sum(3)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

    class FlashAttnFunc(torch.autograd.Function):  # flash_attn_func's autograd: fwd, then bwd with out / lse
        @staticmethod
        def forward(ctx, q, k, v, kw):
            out, lse = fwd(q, k, v, return_lse=True, **{n: x for n, x in kw.items() if n != "block_sparse_tensors_bwd"})[:2]
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.kw = kw
            return out, lse

        @staticmethod
        def backward(ctx, dout, _dlse):
            q, k, v, out, lse = ctx.saved_tensors
            kw = dict(ctx.kw, block_sparse_tensors=ctx.kw["block_sparse_tensors_bwd"])
            del kw["block_sparse_tensors_bwd"]
            return (*bwd(q, k, v, out, dout, lse, **kw), None)

    def flash_attn_func(q, k, v, *, softmax_scale=None, causal=False, pack_gqa=None, mask_mod=None, aux_tensors=None,
                        block_sparse_tensors=None, block_sparse_tensors_bwd=None):
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        return FlashAttnFunc.apply(q, k, v, dict(softmax_scale=scale, causal=causal, pack_gqa=pack_gqa,
                                                 mask_mod=mask_mod, aux_tensors=aux_tensors,
                                                 block_sparse_tensors=block_sparse_tensors,
                                                 block_sparse_tensors_bwd=block_sparse_tensors_bwd))

    bs = types.ModuleType("flash_attn.cute.block_sparsity")
    bs.BlockSparseTensorsTorch = BlockSparseTensorsTorch
    itf = types.ModuleType("flash_attn.cute.interface")
    itf._flash_attn_fwd, itf._flash_attn_bwd = fwd, bwd
    cute = types.ModuleType("flash_attn.cute")
    cute.flash_attn_func = flash_attn_func
    for name, mod in (("flash_attn", types.ModuleType("flash_attn")), ("flash_attn.cute", cute),
                      ("flash_attn.cute.block_sparsity", bs), ("flash_attn.cute.interface", itf)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(flash, "_mask_mod", lambda *a: ("mask_mod", a))
