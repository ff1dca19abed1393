"""A float64 stand-in for FlashAttention-4's forward / backward entry points, for CPU tests of the glue
around them (tests/unit/test_flash_split.py): FA4's contract as read from flash-attn-4 4.0.0b36's
``flash_attn/cute/interface.py`` and ``softmax.py``, not its kernels."""

from __future__ import annotations

import math
import sys
import types

import torch


def emulated_fa4(monkeypatch, flash):
    """Stand-ins for ``flash_attn.cute.interface._flash_attn_fwd`` / ``_flash_attn_bwd`` with the contract
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

    def allowed(bst, mask_mod, aux, B, Lq, Lk, transposed):
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
            has_bits, causal, has_kp, *_ = mask_mod[1]
            assert not has_bits and not causal and has_kp  # the full part masks key padding only
            m = m & (aux[3] != 0)[:, None, None, :]
        return (tok(ft) | m).expand(B, -1, -1, -1)

    def scores(q, k, scale):
        G = q.shape[2] // k.shape[2]
        return torch.einsum("bihd,bjhd->bhij", q.double(), k.double().repeat_interleave(G, 2)) * scale, G

    def fwd(q, k, v, *, softmax_scale, causal, pack_gqa, mask_mod, aux_tensors, block_sparse_tensors, return_lse):
        assert not causal and return_lse
        B, Lq, H, _ = q.shape
        s, G = scores(q, k, softmax_scale)
        ok = allowed(block_sparse_tensors, mask_mod, aux_tensors, B, Lq, k.shape[1], False)
        s = s.masked_fill(~ok, -math.inf)
        lse = torch.logsumexp(s, -1)
        p = torch.exp(s - torch.where(lse == -math.inf, 0.0, lse)[..., None])
        o = torch.einsum("bhij,bjhd->bihd", p, v.double().repeat_interleave(G, 2))
        return o.to(q.dtype), lse.float(), None, None, None

    def bwd(q, k, v, out, dout, lse, *, softmax_scale, causal, pack_gqa, mask_mod, aux_tensors,
            block_sparse_tensors):
        assert not causal and lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
        B, Lq, H, _ = q.shape
        s, G = scores(q, k, softmax_scale)
        ok = allowed(block_sparse_tensors, mask_mod, aux_tensors, B, Lq, k.shape[1], True)
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

    bs = types.ModuleType("flash_attn.cute.block_sparsity")
    bs.BlockSparseTensorsTorch = BlockSparseTensorsTorch
    itf = types.ModuleType("flash_attn.cute.interface")
    itf._flash_attn_fwd, itf._flash_attn_bwd = fwd, bwd
    for name, mod in (("flash_attn", types.ModuleType("flash_attn")), ("flash_attn.cute",
                      types.ModuleType("flash_attn.cute")), ("flash_attn.cute.block_sparsity", bs),
                      ("flash_attn.cute.interface", itf)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(flash, "_mask_mod", lambda *a: ("mask_mod", a))
