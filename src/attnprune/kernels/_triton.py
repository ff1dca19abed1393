"""Triton kernels for block-sparse attention (forward, dq, dk/dv). Host code is in attention.py.

Conventions shared by all three kernels:
* scores are kept in the log2 domain: ``s = (q . k) * scale * log2(e)``, ``p = exp2(s - lse2)``;
* ``LSE`` holds ``lse2 = m + log2(l)`` per query row, ``+inf`` for a row with no kept key
  (so that its probabilities, and therefore its gradients, are exactly zero); with attention sinks
  (``HAS_SINKS``) the forward counts the head's sink in ``l`` and ``lse2`` (a key of value 0), so the
  backward kernels need nothing more;
* every (head, query block) list has its unmasked ("clean") blocks first: those run with no
  per-element masking; the rest ("masked") apply key bounds, causality and the packed bitmask;
* a layout block (BQ x BK) may be split into several kernel tiles (BLOCK_M x BLOCK_N).

The dk/dv inner loop (``_dkdv_blocks``) and the split dk/dv kernels for long kv-block columns are in
:mod:`attnprune.kernels._triton_bwd`.
"""

import triton
import triton.language as tl

from ._triton_bwd import _bits_ok, _dkdv_blocks, _kv_tile, _tanh


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, KPM, BITS, KD, VD, SINK,
    FPTR, FCLEAN, FCOL, FCODE,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, som, sod,
    skpb,
    Hq, G, LH, Lq, Lk, Qb, qk_scale, q_offset,
    BQ: tl.constexpr, BK: tl.constexpr, NW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_BITS: tl.constexpr, USE_TMA: tl.constexpr,
    SOFTCAP: tl.constexpr = False, CAP_IN: tl.constexpr = 0.0, CAP_OUT: tl.constexpr = 0.0,
    FAST_TANH: tl.constexpr = False,
    HAS_SINKS: tl.constexpr = False,
):
    SPLIT: tl.constexpr = BK // BLOCK_N
    if CAUSAL:  # later query tiles see more keys: start them first
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // G
    qb = (pid_m * BLOCK_M) // BQ
    r = (h % LH) * Qb + qb
    kv_row0 = (b * (Hq // G) + hk) * Lk  # row of this (batch, kv head) in the [B*Hkv*Lk, D] view

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    offs_nb = tl.arange(0, BLOCK_N)
    row_ok = offs_m < Lq
    rows_in_block = offs_m - qb * BQ

    q_ptrs = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    kpm_base = KPM + b.to(tl.int64) * skpb

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV], tl.float32)

    start = tl.load(FPTR + r)
    end = tl.load(FPTR + r + 1)
    mid = start + tl.load(FCLEAN + r)

    # ---- blocks kept entirely, inside the key range, off the causal diagonal: no masking
    for t in range(start * SPLIT, mid * SPLIT):
        e = t // SPLIT
        s = t % SPLIT
        kb = tl.load(FCOL + e)
        offs_n = kb * BK + s * BLOCK_N + offs_nb
        if USE_TMA:
            n0 = kv_row0 + kb * BK + s * BLOCK_N
            k = KD.load([n0, 0])
            v = VD.load([n0, 0])
            qk = tl.dot(q, tl.trans(k))
        else:
            k = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd)
            v = tl.load(v_base + offs_n[:, None] * svn + offs_dv[None, :] * svd)
            qk = tl.dot(q, k)
        if SOFTCAP:  # capped scores, log2 domain
            qk = _tanh(qk * CAP_IN, FAST_TANH) * CAP_OUT
            if HAS_KPM:
                qk = tl.where((tl.load(kpm_base + offs_n) != 0)[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk - m_use[:, None])
        elif HAS_KPM:
            kp = tl.load(kpm_base + offs_n) != 0
            qk = tl.where(kp[None, :], qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk - m_use[:, None])
        else:  # every entry kept: rows never all -inf (qk_scale > 0 is checked on the host)
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_use = m_new
            p = tl.math.exp2(qk * qk_scale - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new

    # ---- blocks that need a per-element mask
    for t in range(mid * SPLIT, end * SPLIT):
        e = t // SPLIT
        s = t % SPLIT
        kb = tl.load(FCOL + e)
        code = tl.load(FCODE + e)
        cols_in_block = s * BLOCK_N + offs_nb
        offs_n = kb * BK + cols_in_block
        col_ok = offs_n < Lk
        k = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd, mask=col_ok[None, :], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_dv[None, :] * svd, mask=col_ok[:, None], other=0.0)
        if SOFTCAP:
            qk = _tanh(tl.dot(q, k) * CAP_IN, FAST_TANH) * CAP_OUT
        else:
            qk = tl.dot(q, k) * qk_scale
        ok = col_ok[None, :]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None] + q_offset)
        if HAS_KPM:
            kp = tl.load(kpm_base + offs_n, mask=col_ok, other=0) != 0
            ok = ok & kp[None, :]
        if HAS_BITS:
            ok = ok & _bits_ok(BITS, code, rows_in_block, cols_in_block, s * BLOCK_N, BQ, NW, False)
        qk = tl.where(ok, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new

    if HAS_SINKS:  # the head's sink: one more key (log2-domain logit SINK[h]) whose value is 0
        s2 = tl.load(SINK + h)
        m_new = tl.maximum(m_i, s2)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.math.exp2(s2 - m_use)
        acc = acc * alpha[:, None]
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    o_ptrs = O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m[:, None] * som + offs_dv[None, :] * sod
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * Lq + offs_m, lse, mask=row_ok)


@triton.jit
def _dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, KPM, BITS,
    FPTR, FCLEAN, FCOL, FCODE,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdob, sdoh, sdom, sdod,
    sdqb, sdqh, sdqm, sdqd,
    skpb,
    Hq, G, LH, Lq, Lk, Qb, qk_scale, sm_scale, q_offset,
    BQ: tl.constexpr, BK: tl.constexpr, NW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_BITS: tl.constexpr, PRESCALE: tl.constexpr,
    SOFTCAP: tl.constexpr = False, CAP_IN: tl.constexpr = 0.0, CAP_OUT: tl.constexpr = 0.0,
    FAST_TANH: tl.constexpr = False,
):
    SPLIT: tl.constexpr = BK // BLOCK_N
    if CAUSAL:  # later query tiles see more keys: start them first
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // G
    qb = (pid_m * BLOCK_M) // BQ
    r = (h % LH) * Qb + qb

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    offs_nb = tl.arange(0, BLOCK_N)
    row_ok = offs_m < Lq
    rows_in_block = offs_m - qb * BQ

    q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b.to(tl.int64) * sdob + h.to(tl.int64) * sdoh + offs_m[:, None] * sdom + offs_dv[None, :] * sdod,
                 mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * Lq + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * Lq + offs_m, mask=row_ok, other=0.0)
    k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    kpm_base = KPM + b.to(tl.int64) * skpb
    dq = tl.zeros([BLOCK_M, D], tl.float32)

    start = tl.load(FPTR + r)
    end = tl.load(FPTR + r + 1)
    mid = start + tl.load(FCLEAN + r)
    for t in range(start * SPLIT, mid * SPLIT):
        e = t // SPLIT
        s = t % SPLIT
        kb = tl.load(FCOL + e)
        offs_n = kb * BK + s * BLOCK_N + offs_nb
        kT = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd)
        vT = tl.load(v_base + offs_n[None, :] * svn + offs_dv[:, None] * svd)
        if SOFTCAP:
            th = _tanh(tl.dot(q, kT) * CAP_IN, FAST_TANH)
            p = tl.math.exp2(th * CAP_OUT - lse[:, None])
        elif PRESCALE:  # scale the scores first (separate multiply), or fold it into the exponent
            qk = tl.dot(q, kT) * qk_scale
            p = tl.math.exp2(qk - lse[:, None])
        else:
            qk = tl.dot(q, kT)
            p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if HAS_KPM:
            kp = tl.load(kpm_base + offs_n) != 0
            p = tl.where(kp[None, :], p, 0.0)
        dp = tl.dot(do, vT)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - th * th)
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq)
    for t in range(mid * SPLIT, end * SPLIT):
        e = t // SPLIT
        s = t % SPLIT
        kb = tl.load(FCOL + e)
        code = tl.load(FCODE + e)
        cols_in_block = s * BLOCK_N + offs_nb
        offs_n = kb * BK + cols_in_block
        col_ok = offs_n < Lk
        kT = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd, mask=col_ok[None, :], other=0.0)
        vT = tl.load(v_base + offs_n[None, :] * svn + offs_dv[:, None] * svd, mask=col_ok[None, :], other=0.0)
        qk = tl.dot(q, kT)
        ok = col_ok[None, :]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None] + q_offset)
        if HAS_KPM:
            kp = tl.load(kpm_base + offs_n, mask=col_ok, other=0) != 0
            ok = ok & kp[None, :]
        if HAS_BITS:
            ok = ok & _bits_ok(BITS, code, rows_in_block, cols_in_block, s * BLOCK_N, BQ, NW, False)
        if SOFTCAP:
            th = _tanh(qk * CAP_IN, FAST_TANH)
            p = tl.where(ok, tl.math.exp2(th * CAP_OUT - lse[:, None]), 0.0)
        else:
            p = tl.where(ok, tl.math.exp2(qk * qk_scale - lse[:, None]), 0.0)
        dp = tl.dot(do, vT)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - th * th)
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq)
    dq = dq * sm_scale
    tl.store(DQ + b.to(tl.int64) * sdqb + h.to(tl.int64) * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, DK, DV_, LSE, DELTA, KPM, BITS,
    BPTR, BCLEAN, BROW, BCODE,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdob, sdoh, sdom, sdod,
    sdkb, sdkh, sdkn, sdkd,
    sdvb, sdvh, sdvn, sdvd,
    skpb,
    Hq, Hkv, G, LH, Lq, Lk, Kb, qk_scale, sm_scale, q_offset,
    BQ: tl.constexpr, BK: tl.constexpr, NW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_BITS: tl.constexpr, PRESCALE: tl.constexpr,
    SOFTCAP: tl.constexpr = False, CAP_IN: tl.constexpr = 0.0, CAP_OUT: tl.constexpr = 0.0,
    FAST_TANH: tl.constexpr = False,
):
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // Hkv
    hk = bhk % Hkv
    kb = (pid_n * BLOCK_N) // BK

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    col_ok = offs_n < Lk
    cols_in_block = offs_n - kb * BK

    k, v, kp = _kv_tile(K, V, KPM, b, hk, offs_n, col_ok, skb, skh, skn, skd, svb, svh, svn, svd, skpb,
                        D, DV, HAS_KPM)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, DV], tl.float32)

    for g in range(0, G):
        h = hk * G + g
        c = (h % LH) * Kb + kb
        start = tl.load(BPTR + c)
        end = tl.load(BPTR + c + 1)
        mid = start + tl.load(BCLEAN + c)
        dk, dv = _dkdv_blocks(
            dk, dv, k, v, kp, offs_n, col_ok, cols_in_block,
            Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh, DO + b.to(tl.int64) * sdob + h.to(tl.int64) * sdoh,
            LSE, DELTA, (b * Hq + h).to(tl.int64) * Lq, BROW, BCODE, BITS,
            start, mid, mid, end,
            sqm, sqd, sdom, sdod, Lq, qk_scale, q_offset,
            BQ, NW, BLOCK_M, D, DV, CAUSAL, HAS_KPM, HAS_BITS, PRESCALE, SOFTCAP, CAP_IN, CAP_OUT, FAST_TANH,
        )

    dk = dk * sm_scale
    tl.store(DK + b.to(tl.int64) * sdkb + hk.to(tl.int64) * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV_ + b.to(tl.int64) * sdvb + hk.to(tl.int64) * sdvh + offs_n[:, None] * sdvn + offs_dv[None, :] * sdvd,
             dv.to(DV_.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _delta_kernel(O, DO, DELTA, sob, soh, som, sod, sdob, sdoh, sdom, sdod, Hq, Lq,
                  BLOCK_M: tl.constexpr, DV: tl.constexpr):
    # delta[b, h, i] = sum_d O[b, h, i, d] * dO[b, h, i, d]  (fp32), one read of O and dO
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, DV)
    ok = offs_m < Lq
    o = tl.load(O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
                mask=ok[:, None], other=0.0)
    do = tl.load(DO + b.to(tl.int64) * sdob + h.to(tl.int64) * sdoh + offs_m[:, None] * sdom + offs_d[None, :] * sdod,
                 mask=ok[:, None], other=0.0)
    tl.store(DELTA + bh.to(tl.int64) * Lq + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=ok)
