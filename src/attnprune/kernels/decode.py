"""``masked_decode``: split-KV ("flash-decoding") Triton attention of a few queries over a compacted,
position-tagged KV cache (``PrunedKVCache``), with the site's static keep mask looked up in the kernel.

Semantics, for query ``i`` of head ``h`` (kv head ``g = h // (Hq // Hkv)``) and cache slot ``c``::

    allowed(b, h, i, c) = pos[b, g, c] >= 0                       # -1: an empty slot
                          and pos[b, g, c] <= q_pos[b, i]          # causal in positions
                          and (window is None or q_pos[b, i] - pos[b, g, c] < window)
                          and keep(h, q_pos[b, i], pos[b, g, c])   # the site mask
    keep(h, p, k) = keep_table[h, p // block, k // block]  if p < q_len and k < k_len  else True
    out[b, h, i] = softmax over allowed c of (q . k_c * scale) applied to v_c; 0 if nothing is allowed

With a logit cap ``softcap`` the scores are ``softcap * tanh(q . k_c * scale / softcap)``; with attention
sinks ``sinks [Hq]`` every row's denominator also holds ``exp(sinks[h])`` (:mod:`attnprune.softmax`).

(positions outside the calibrated ``q_len x k_len`` region are kept, as ``SiteMask.keep_at`` does
under ``beyond="dense"``/``"error"``; ``beyond="extend"`` past the calibration is not handled here.)
Grid: one program per (batch, kv head, split of the cache); each program computes all ``G * n`` query
rows of its kv head's group against its split of the keys (one read of K/V per group) and writes a
partial output and log-sum-exp; a second small kernel combines the splits. With one split the first
kernel writes the output directly. fp32 accumulation; scores in the log2 domain.
"""

from __future__ import annotations

import math

import torch

from ..errors import InvalidArgumentError
from .config import _LOG2E, cap_args

__all__ = ["masked_decode", "masked_decode_reference", "usable", "MAX_QUERIES"]

MAX_QUERIES = 16  # queries per call the kernel is meant for (decode steps; a prompt runs elsewhere)
_SM_COUNT: dict = {}
_PLANS: dict = {}  # call shapes -> checked launch parameters (masked_decode)

try:  # the kernels are defined only where Triton is installed
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

if triton is not None:
    from ._triton_bwd import _tanh

    @triton.jit
    def _decode_kernel(
        Q, K, V, POS, QPOS, KEEP, OP, LP, O, SINK,
        sqb, sqh, sqn, sqd,
        skb, skh, skc, skd,
        svb, svh, svc, svd,
        spb, sph, spc,
        sqpb, sqpn,
        skeh, skeq, skek,
        sob, soh, son, sod,
        Hkv, G, N, C, chunk, S, q_len, k_len, blk, window, qk_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
        DP: tl.constexpr, DVP: tl.constexpr, HAS_WINDOW: tl.constexpr, SINGLE: tl.constexpr,
        IEEE: tl.constexpr, HAS_SINKS: tl.constexpr = False,
        SOFTCAP: tl.constexpr = False, CAP_IN: tl.constexpr = 0.0, CAP_OUT: tl.constexpr = 0.0,
        FAST_TANH: tl.constexpr = False,
    ):
        bg = tl.program_id(0)
        split = tl.program_id(1)
        b = bg // Hkv
        g = bg % Hkv
        Hq = Hkv * G

        offs_m = tl.arange(0, BLOCK_M)  # row r: head g * G + r // N, query r % N
        row_ok = offs_m < G * N
        h = g * G + offs_m // N
        qi = offs_m % N
        offs_d = tl.arange(0, DP)
        offs_dv = tl.arange(0, DVP)
        d_ok = offs_d < D
        dv_ok = offs_dv < DV

        q = tl.load(Q + b.to(tl.int64) * sqb + h[:, None].to(tl.int64) * sqh + qi[:, None] * sqn
                    + offs_d[None, :] * sqd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        qp = tl.load(QPOS + b.to(tl.int64) * sqpb + qi * sqpn, mask=row_ok, other=0)  # [M] long
        q_in = qp < q_len
        keep_row = KEEP + h.to(tl.int64) * skeh + (qp // blk) * skeq  # [M] pointers

        k_base = K + b.to(tl.int64) * skb + g.to(tl.int64) * skh
        v_base = V + b.to(tl.int64) * svb + g.to(tl.int64) * svh
        p_base = POS + b.to(tl.int64) * spb + g.to(tl.int64) * sph

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, DVP], tl.float32)

        lo = split * chunk
        hi = tl.minimum(lo + chunk, C)
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            col_ok = offs_n < hi
            kp = tl.load(p_base + offs_n * spc, mask=col_ok, other=-1)  # [N] long, -1 empty
            k = tl.load(k_base + offs_n[None, :] * skc + offs_d[:, None] * skd,
                        mask=col_ok[None, :] & d_ok[:, None], other=0.0)  # [DP, BLOCK_N]
            v = tl.load(v_base + offs_n[:, None] * svc + offs_dv[None, :] * svd,
                        mask=col_ok[:, None] & dv_ok[None, :], other=0.0)  # [BLOCK_N, DVP]
            if IEEE:
                qk = tl.dot(q, k, input_precision="ieee")
            else:
                qk = tl.dot(q, k)
            ok = row_ok[:, None] & (kp[None, :] >= 0) & (kp[None, :] <= qp[:, None])
            if HAS_WINDOW:
                ok = ok & (qp[:, None] - kp[None, :] < window)
            inside = q_in[:, None] & (kp[None, :] < k_len)
            kv = tl.load(keep_row[:, None] + (kp[None, :] // blk) * skek, mask=ok & inside, other=1)
            ok = ok & (kv != 0)
            if SOFTCAP:
                s = tl.where(ok, _tanh(qk * CAP_IN, FAST_TANH) * CAP_OUT, float("-inf"))
            else:
                s = tl.where(ok, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_use[:, None])
            alpha = tl.math.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
            else:
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new

        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        if SINGLE and HAS_SINKS:  # the sink's share in the denominator (an empty row: 0 / e^s = 0)
            sink = tl.load(SINK + h, mask=row_ok, other=0.0) * 1.4426950408889634
            l_safe = l_i + tl.math.exp2(sink - tl.where(m_i == float("-inf"), 0.0, m_i))
        out = acc / l_safe[:, None]
        if SINGLE:
            o_ptrs = (O + b.to(tl.int64) * sob + h[:, None].to(tl.int64) * soh + qi[:, None] * son
                      + offs_dv[None, :] * sod)
            tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])
        else:
            row = ((b * Hq + h) * N + qi).to(tl.int64)  # [M]
            lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe))
            tl.store(OP + (row[:, None] * S + split) * DVP + offs_dv[None, :], out, mask=row_ok[:, None])
            tl.store(LP + row * S + split, lse, mask=row_ok)

    @triton.jit
    def _combine_kernel(OP, LP, O, SINK, sob, soh, son, sod, Hq, N, S,
                        SP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr, HAS_SINKS: tl.constexpr = False):
        row = tl.program_id(0)
        b = row // (Hq * N)
        h = (row // N) % Hq
        i = row % N
        offs_s = tl.arange(0, SP)
        offs_dv = tl.arange(0, DVP)
        s_ok = offs_s < S
        lse = tl.load(LP + row.to(tl.int64) * S + offs_s, mask=s_ok, other=float("-inf"))
        m = tl.max(lse, 0)
        m_use = tl.where(m == float("-inf"), 0.0, m)
        w = tl.math.exp2(lse - m_use)  # 0 for empty splits
        o = tl.load(OP + (row.to(tl.int64) * S + offs_s[:, None]) * DVP + offs_dv[None, :], mask=s_ok[:, None],
                    other=0.0)
        tot = tl.sum(w, 0)
        if HAS_SINKS:
            tot = tot + tl.math.exp2(tl.load(SINK + h) * 1.4426950408889634 - m_use)
        out = tl.sum(o * w[:, None], 0) / tl.where(tot == 0.0, 1.0, tot)
        tl.store(O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + i.to(tl.int64) * son + offs_dv * sod,
                 out.to(O.dtype.element_ty), mask=offs_dv < DV)


FORCE = False  # tests: use the kernel on CPU tensors too (under TRITON_INTERPRET=1)


def usable(q: torch.Tensor) -> bool:
    """True when :func:`masked_decode` can run on ``q``'s device: Triton installed and a CUDA tensor
    (or ``FORCE`` under the interpreter) with at most ``MAX_QUERIES`` queries."""
    return triton is not None and (q.is_cuda or FORCE) and q.shape[2] <= MAX_QUERIES


def _p2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SM_COUNT:
        _SM_COUNT[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SM_COUNT[key]


def masked_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, q_pos: torch.Tensor,
                  keep: torch.Tensor, block: int = 1, *, scale: float | None = None, window: int | None = None,
                  q_len: int | None = None, k_len: int | None = None, splits: int | None = None,
                  block_n: int | None = None, sinks: torch.Tensor | None = None,
                  softcap: float | None = None) -> torch.Tensor:
    """Masked attention of decode queries over a compacted KV cache (semantics: the module docstring).

    Args:
        q: ``[B, Hq, n, D]`` queries (``n`` small: 1..``MAX_QUERIES``).
        k: ``[B, Hkv, C, D]`` and v: ``[B, Hkv, C, Dv]``: the cache's keys and values (any strides;
            ``Hq`` a multiple of ``Hkv``; query head ``h`` reads kv head ``h // (Hq // Hkv)``).
        pos: long ``[B, Hkv, C]``: the position of each slot, -1 for an empty one.
        q_pos: long ``[B or 1, n]``: the queries' positions (>= 0).
        keep: ``[Hq, Qt, Kt]`` bool / uint8 / int8: the site's keep table, token level (``block=1``)
            or block level (entry ``[h, p // block, k // block]``).
        block: the keep table's block size (1: tokens).
        scale: softmax scale (None: ``1 / sqrt(D)``). window: sliding window (None: none).
        q_len, k_len: the calibrated lengths (default ``Qt * block``, ``Kt * block``); positions at or
            past them are kept.
        splits, block_n: override the number of key splits / the key tile (tests, tuning).
        sinks: ``[Hq]`` attention-sink logits, or None. softcap: a logit cap, or None.

    Returns ``[B, Hq, n, Dv]`` in ``q``'s dtype (fp32 accumulation); rows with nothing allowed are 0.
    """
    if triton is None:  # pragma: no cover - depends on the install
        from ..errors import MissingDependencyError

        raise MissingDependencyError("masked_decode needs the 'triton' package: pip install 'attnprune[kernels]'")
    if keep.dtype == torch.bool:
        keep = keep.view(torch.uint8)
    key = (q.shape, k.shape, v.shape, pos.shape, q_pos.shape, keep.shape, q.dtype, q.device, block, scale, window,
           q_len, k_len, splits, block_n, sinks is not None, softcap)
    plan = _PLANS.get(key)
    if plan is None:  # shapes checked and launch parameters worked out once per shape (decode: per compaction)
        if len(_PLANS) >= 256:
            _PLANS.clear()
        plan = _PLANS[key] = _plan(q, k, v, pos, q_pos, keep, block, scale, window, q_len, k_len, splits, block_n,
                                   sinks is not None, softcap)
    B, Hq, n, Hkv, DV, S, single, args, meta = plan
    o = torch.empty(B, Hq, n, DV, dtype=q.dtype, device=q.device)
    if B == 0 or n == 0:
        return o
    if single:
        op = lp = o  # unused
    else:
        op = torch.empty(B * Hq * n, S, meta["DVP"], dtype=torch.float32, device=q.device)
        lp = torch.empty(B * Hq * n, S, dtype=torch.float32, device=q.device)
    sqpb = q_pos.stride(0) if q_pos.shape[0] > 1 else 0
    sink = o if sinks is None else sinks.detach().to(q.device, torch.float32).contiguous()  # (unread without sinks)
    _decode_kernel[(B * Hkv, S)](
        q, k, v, pos, q_pos, keep, op, lp, o, sink,
        *q.stride(), *k.stride(), *v.stride(), *pos.stride(), sqpb, q_pos.stride(1), *keep.stride(),
        *o.stride(), *args, **meta)
    if not single:
        _combine_kernel[(B * Hq * n,)](op, lp, o, sink, *o.stride(), Hq, n, S, SP=max(2, _p2(S)), DV=DV,
                                       DVP=meta["DVP"], HAS_SINKS=sinks is not None)
    return o


def _plan(q, k, v, pos, q_pos, keep, block, scale, window, q_len, k_len, splits, block_n, has_sinks=False,
          softcap=None) -> tuple:
    """Check the shapes of a :func:`masked_decode` call and work out its launch: ``(B, Hq, n, Hkv, DV,
    S, single, the kernel's scalar arguments after the strides, its keyword arguments)``."""
    B, Hq, n, D = q.shape
    Hkv, C, DV = k.shape[1], k.shape[2], v.shape[3]
    if Hq % Hkv or k.shape[0] != B or v.shape[:3] != k.shape[:3] or tuple(pos.shape) != (B, Hkv, C):
        raise InvalidArgumentError(f"masked_decode: bad shapes q {list(q.shape)}, k {list(k.shape)}, "
                                   f"v {list(v.shape)}, pos {list(pos.shape)}")
    if q_pos.dim() != 2 or q_pos.shape[1] != n or q_pos.shape[0] not in (1, B):
        raise InvalidArgumentError(f"masked_decode: q_pos must be [B or 1, {n}], got {list(q_pos.shape)}")
    if keep.dim() != 3 or keep.shape[0] != Hq:
        raise InvalidArgumentError(f"masked_decode: keep must be [{Hq}, Qt, Kt], got {list(keep.shape)}")
    G = Hq // Hkv
    block = int(block)
    q_len = keep.shape[1] * block if q_len is None else int(q_len)
    k_len = keep.shape[2] * block if k_len is None else int(k_len)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    interp = q.device.type != "cuda"
    BLOCK_M = max(16, _p2(G * n))
    DP, DVP = max(16, _p2(D)), max(16, _p2(DV))
    if block_n is None:
        block_n = 16 if interp else (64 if BLOCK_M * max(DP, DVP) <= 64 * 128 else 32)
    BLOCK_N = int(block_n)
    tiles = max(1, -(-C // BLOCK_N))
    if splits is None:
        # split only long caches (one launch, no combine, for a compacted one): >= 512 keys a split
        splits = max(1, min(tiles, -(-C // 512), -(-2 * _sm_count(q.device) // max(1, B * Hkv)), 64))
    per = -(-tiles // max(1, min(int(splits), tiles)))  # tiles per split
    chunk = per * BLOCK_N
    S = max(1, -(-C // chunk))
    single = S == 1
    args = (Hkv, G, n, C, chunk, S, q_len, k_len, block, int(window) if window is not None else 0, scale * _LOG2E)
    meta = dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, D=D, DV=DV, DP=DP, DVP=DVP, HAS_WINDOW=window is not None,
                SINGLE=single, IEEE=q.dtype == torch.float32, HAS_SINKS=bool(has_sinks))
    meta.update(cap_args(scale, softcap, q))
    if not interp:
        meta.update(num_warps=4, num_stages=2)
    return B, Hq, n, Hkv, DV, S, single, args, meta


def masked_decode_reference(q, k, v, pos, q_pos, keep, block: int = 1, *, scale=None, window=None,
                            q_len=None, k_len=None, dtype=torch.float64, sinks=None, softcap=None) -> torch.Tensor:
    """Plain PyTorch, same arguments and semantics as :func:`masked_decode` (computed in ``dtype``)."""
    B, Hq, n, D = q.shape
    Hkv, C = k.shape[1], k.shape[2]
    G = Hq // Hkv
    keep = keep.bool()
    q_len = keep.shape[1] * block if q_len is None else q_len
    k_len = keep.shape[2] * block if k_len is None else k_len
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    kp = pos.repeat_interleave(G, dim=1)[:, :, None, :]  # [B, Hq, 1, C]
    qp = q_pos.expand(B, n)[:, None, :, None]  # [B, 1, n, 1]
    heads = torch.arange(Hq, device=q.device)[None, :, None, None]
    table = keep[heads, (qp.clamp(0, q_len - 1) // block), (kp.clamp(0, k_len - 1) // block)]
    inside = (qp < q_len) & (kp < k_len)
    allowed = (kp >= 0) & (kp <= qp) & (table | ~inside)
    if window is not None:
        allowed = allowed & (qp - kp < window)
    kk = k.to(dtype).repeat_interleave(G, dim=1)
    vv = v.to(dtype).repeat_interleave(G, dim=1)
    s = (q.to(dtype) @ kk.transpose(-1, -2)) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~allowed, float("-inf"))
    if sinks is not None:  # one more column: the sink's logit, value 0
        col = sinks.to(dtype).reshape(1, -1, 1, 1).expand(*s.shape[:-1], 1)
        s = torch.cat([s, col], -1)
        vv = torch.cat([vv, vv.new_zeros(*vv.shape[:2], 1, vv.shape[-1])], 2)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ vv).masked_fill(~allowed.any(-1, keepdim=True), 0.0)
