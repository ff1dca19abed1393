"""Triton dK/dV backward pieces: the shared inner loop, the split (work-item) kernel, its reduction.

Conventions are those of :mod:`attnprune.kernels._triton` (log2-domain scores, ``LSE`` = ``+inf``
for empty rows, clean entries of each list before masked ones).

* :func:`_dkdv_blocks` accumulates one kv tile's ``dk``/``dv`` over a range of one dK/dV list; both
  ``_triton._dkdv_kernel`` (one program per kv tile, the common path) and
  :func:`_dkdv_items_kernel` call it (Triton inlines it).
* :func:`_dkdv_items_kernel` runs one program per *work item* of a
  :class:`~attnprune.kernels._split.DkdvSplit`: a range ``[u0, u1)`` of a kv tile's work list (the
  concatenation over the ``G`` query heads of its group of their dK/dV lists). An unsplit tile is
  one item over its whole list and stores ``dk``/``dv`` directly, as the common path does; a chunk
  of a split tile stores its unscaled fp32 partial sums in a scratch slot.
* :func:`_dkdv_reduce_kernel` sums the slots of each split tile in chunk order (deterministic,
  no atomics), applies the scale and stores ``dk``/``dv``.
"""

import os

import triton
import triton.language as tl

# ``ATTNPRUNE_TRITON_BITS=gather`` (read at import) loads the bitmask word of every element separately, as
# before 2026-12-05, instead of one word per (row, 32 columns) in :func:`_bits_ok`: for an A/B on the GPU.
_GATHER_BITS = tl.constexpr(os.environ.get("ATTNPRUNE_TRITON_BITS", "rows") == "gather")


@triton.jit
def _bits_ok(BITS, code, rows, cols, col0, BQ: tl.constexpr, NW: tl.constexpr, TRANS: tl.constexpr):
    """The packed bitmask of layout block ``code`` at query rows ``rows`` [R] (within the block) and key
    columns ``cols`` [C] (within the block: ``col0 + arange(C)``, ``col0`` a multiple of ``C``): bool
    ``[R, C]`` (``TRANS``: ``[C, R]``), all True when ``code < 0`` (a block kept whole).

    Bits ``[P, BQ, NW]`` int32: bit ``c % 32`` of word ``c // 32`` of row ``r`` of block ``p``. The C columns
    span ``ceil(C / 32)`` words per row: one load of ``[R]`` words each, spread over the columns by
    selects, instead of one (cached, but issued) load per element."""
    if _GATHER_BITS:
        if TRANS:
            words = tl.load(BITS + code.to(tl.int64) * (BQ * NW) + rows[None, :] * NW + cols[:, None] // 32,
                            mask=(cols[:, None] * 0 + rows[None, :] * 0 + code) >= 0, other=-1)
            return ((words >> (cols[:, None] % 32)) & 1) != 0
        else:
            words = tl.load(BITS + code.to(tl.int64) * (BQ * NW) + rows[:, None] * NW + cols[None, :] // 32,
                            mask=(rows[:, None] * 0 + cols[None, :] * 0 + code) >= 0, other=-1)
            return ((words >> (cols[None, :] % 32)) & 1) != 0
    else:
        NWT: tl.constexpr = (cols.shape[0] + 31) // 32  # words a row of the tile spans
        base = BITS + tl.maximum(code, 0).to(tl.int64) * (BQ * NW) + rows * NW + col0 // 32  # [R] pointers
        sub = cols // 32 - col0 // 32  # [C]: which of the tile's words holds each column
        shift = cols % 32
        first = tl.load(base)
        if TRANS:
            words = first[None, :] + shift[:, None] * 0
            for i in tl.static_range(1, NWT):
                words = tl.where(sub[:, None] == i, tl.load(base + i)[None, :], words)
            return (((words >> shift[:, None]) & 1) != 0) | (code < 0)
        else:
            words = first[:, None] + shift[None, :] * 0
            for i in tl.static_range(1, NWT):
                words = tl.where(sub[None, :] == i, tl.load(base + i)[:, None], words)
            return (((words >> shift[None, :]) & 1) != 0) | (code < 0)


@triton.jit
def _tanh(x, FAST: tl.constexpr):
    """``tanh(x)`` for logit soft-capping: scores ``CAP_OUT * tanh(q.k * CAP_IN)`` with ``CAP_IN = scale / cap``
    and ``CAP_OUT = cap * log2(e)`` (log2 domain), derivative factor ``1 - tanh^2``. ``FAST``: NVIDIA's
    ``tanh.approx.f32`` (one special-function op; relative error about 2^-11; the host enables it for 16-bit
    inputs on CUDA only, see :func:`attnprune.kernels.config.cap_args`); else ``1 - 2 / (1 + e^(2x))`` from
    ``exp2`` (every backend and the interpreter; exact at both infinities), an exp2 and a division more."""
    if FAST:
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return 1.0 - 2.0 / (1.0 + tl.math.exp2(x * 2.8853900817779268))


@triton.jit
def _kv_tile(K, V, KPM, b, hk, offs_n, col_ok, skb, skh, skn, skd, svb, svh, svn, svd, skpb,
             D: tl.constexpr, DV: tl.constexpr, HAS_KPM: tl.constexpr):
    """One key tile's keys ``[BLOCK_N, D]``, values ``[BLOCK_N, DV]`` (zeros past the keys) and which of
    its columns are real keys ``[BLOCK_N]`` (inside the length, not padding)."""
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    k = tl.load(K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=col_ok[:, None], other=0.0)
    v = tl.load(V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                mask=col_ok[:, None], other=0.0)
    if HAS_KPM:
        kp = tl.load(KPM + b.to(tl.int64) * skpb + offs_n, mask=col_ok, other=0) != 0
    else:
        kp = col_ok
    return k, v, kp


@triton.jit
def _dkdv_blocks(
    dk, dv, k, v, kp, offs_n, col_ok, cols_in_block,
    q_base, do_base, LSE, DELTA, stat_base, BROW, BCODE, BITS,
    c_lo, c_hi, m_lo, m_hi,
    sqm, sqd, sdom, sdod, Lq, qk_scale, q_offset,
    BQ: tl.constexpr, NW: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_BITS: tl.constexpr, PRESCALE: tl.constexpr,
    SOFTCAP: tl.constexpr, CAP_IN: tl.constexpr, CAP_OUT: tl.constexpr,
    FAST_TANH: tl.constexpr,
):
    """Add to ``dk`` [BLOCK_N, D] / ``dv`` [BLOCK_N, DV] (fp32, unscaled) the list entries
    ``[c_lo, c_hi)`` (clean: no masking) and ``[m_lo, m_hi)`` (masked) of one dK/dV list.

    ``k`` [BLOCK_N, D], ``v`` [BLOCK_N, DV]: this kv tile (keys ``offs_n``); ``kp`` [BLOCK_N] its key
    padding (ignored unless HAS_KPM); ``q_base``/``do_base``: pointers to query head ``h``'s q / dO
    of this batch element; ``stat_base``: ``(b * Hq + h) * Lq`` into LSE / DELTA.
    """
    SPLIT: tl.constexpr = BQ // BLOCK_M
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    offs_mb = tl.arange(0, BLOCK_M)
    col0 = tl.min(cols_in_block, 0)  # the tile's first column within its layout block
    for t in range(c_lo * SPLIT, c_hi * SPLIT):
        e = t // SPLIT
        s = t % SPLIT
        qb = tl.load(BROW + e)
        offs_m = qb * BQ + s * BLOCK_M + offs_mb
        row_ok = offs_m < Lq
        qT = tl.load(q_base + offs_m[None, :] * sqm + offs_d[:, None] * sqd, mask=row_ok[None, :], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * sdom + offs_dv[None, :] * sdod, mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + stat_base + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + stat_base + offs_m, mask=row_ok, other=0.0)
        if SOFTCAP:
            thT = _tanh(tl.dot(k, qT) * CAP_IN, FAST_TANH)
            pT = tl.math.exp2(thT * CAP_OUT - lse[None, :])
        elif PRESCALE:
            qkT = tl.dot(k, qT) * qk_scale
            pT = tl.math.exp2(qkT - lse[None, :])
        else:
            qkT = tl.dot(k, qT)
            pT = tl.math.exp2(qkT * qk_scale - lse[None, :])
        if HAS_KPM:
            pT = tl.where(kp[:, None], pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv)
        dpT = tl.dot(v, tl.trans(do))
        dsT = pT * (dpT - delta[None, :])
        if SOFTCAP:
            dsT = dsT * (1.0 - thT * thT)
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk)
    for t in range(m_lo * SPLIT, m_hi * SPLIT):
        e = t // SPLIT
        s = t % SPLIT
        qb = tl.load(BROW + e)
        code = tl.load(BCODE + e)
        rows_in_block = s * BLOCK_M + offs_mb
        offs_m = qb * BQ + rows_in_block
        row_ok = offs_m < Lq
        qT = tl.load(q_base + offs_m[None, :] * sqm + offs_d[:, None] * sqd, mask=row_ok[None, :], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * sdom + offs_dv[None, :] * sdod, mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + stat_base + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + stat_base + offs_m, mask=row_ok, other=0.0)
        qkT = tl.dot(k, qT)
        ok = col_ok[:, None] & row_ok[None, :]
        if CAUSAL:
            ok = ok & (offs_n[:, None] <= offs_m[None, :] + q_offset)
        if HAS_KPM:
            ok = ok & kp[:, None]
        if HAS_BITS:
            ok = ok & _bits_ok(BITS, code, rows_in_block, cols_in_block, col0, BQ, NW, True)
        if SOFTCAP:
            thT = _tanh(qkT * CAP_IN, FAST_TANH)
            pT = tl.where(ok, tl.math.exp2(thT * CAP_OUT - lse[None, :]), 0.0)
        else:
            pT = tl.where(ok, tl.math.exp2(qkT * qk_scale - lse[None, :]), 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv)
        dpT = tl.dot(v, tl.trans(do))
        dsT = pT * (dpT - delta[None, :])
        if SOFTCAP:
            dsT = dsT * (1.0 - thT * thT)
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk)
    return dk, dv


@triton.jit
def _dkdv_items_kernel(
    Q, K, V, DO, DK, DV_, SK, SV, LSE, DELTA, KPM, BITS,
    BPTR, BCLEAN, BROW, BCODE, ITEMS,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdob, sdoh, sdom, sdod,
    sdkb, sdkh, sdkn, sdkd,
    sdvb, sdvh, sdvn, sdvd,
    skpb,
    Hq, HG, NBG, G, LH, Lq, Lk, Kb, qk_scale, sm_scale, q_offset,
    BQ: tl.constexpr, BK: tl.constexpr, NW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_BITS: tl.constexpr, PRESCALE: tl.constexpr,
    SOFTCAP: tl.constexpr = False, CAP_IN: tl.constexpr = 0.0, CAP_OUT: tl.constexpr = 0.0,
    FAST_TANH: tl.constexpr = False,
):
    """Grid ``(n_items * NSUB * NBG,)``, ``NSUB = BK // BLOCK_N``. Program ``(i * NSUB + sub) * NBG + bg``:
    work item ``i`` on kv sub-tile ``sub`` (keys ``kb*BK + sub*BLOCK_N ..``) of batch ``bg // HG``, kv
    head ``th + bg % HG``. Item-major, so the hardware starts the items in table order (longest first)
    for every batch element before any shorter one.

    ``ITEMS`` int32 ``[n_items, 5]``: ``(th, kb, u0, u1, slot)``; ``slot = -1`` stores into DK/DV,
    else into ``SK`` fp32 ``[n_slots, NBG, BK, D]`` / ``SV`` ``[n_slots, NBG, BK, DV]`` (``NBG = B*HG``).
    """
    NSUB: tl.constexpr = BK // BLOCK_N
    pid = tl.program_id(0)
    bg = pid % NBG
    item = pid // (NSUB * NBG)
    sub = (pid // NBG) % NSUB
    b = bg // HG
    th = tl.load(ITEMS + item * 5)
    kb = tl.load(ITEMS + item * 5 + 1)
    u0 = tl.load(ITEMS + item * 5 + 2)
    u1 = tl.load(ITEMS + item * 5 + 3)
    slot = tl.load(ITEMS + item * 5 + 4)
    hk = th + bg % HG
    n0 = kb * BK + sub * BLOCK_N
    u1 = tl.where(n0 < Lk, u1, u0)  # a sub-tile wholly past the keys has no work

    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    col_ok = offs_n < Lk
    cols_in_block = offs_n - kb * BK
    k, v, kp = _kv_tile(K, V, KPM, b, hk, offs_n, col_ok, skb, skh, skn, skd, svb, svh, svn, svd, skpb,
                        D, DV, HAS_KPM)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, DV], tl.float32)

    off = u0 * 0  # entries of the tile's work list before head g's list
    for g in range(0, G):
        h = hk * G + g
        c = (h % LH) * Kb + kb
        start = tl.load(BPTR + c)
        n = tl.load(BPTR + c + 1) - start
        ncl = tl.load(BCLEAN + c)
        lo = tl.minimum(tl.maximum(u0 - off, 0), n)
        hi = tl.minimum(tl.maximum(u1 - off, 0), n)
        dk, dv = _dkdv_blocks(
            dk, dv, k, v, kp, offs_n, col_ok, cols_in_block,
            Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh, DO + b.to(tl.int64) * sdob + h.to(tl.int64) * sdoh,
            LSE, DELTA, (b * Hq + h).to(tl.int64) * Lq, BROW, BCODE, BITS,
            start + tl.minimum(lo, ncl), start + tl.minimum(hi, ncl),
            start + tl.maximum(lo, ncl), start + tl.maximum(hi, ncl),
            sqm, sqd, sdom, sdod, Lq, qk_scale, q_offset,
            BQ, NW, BLOCK_M, D, DV, CAUSAL, HAS_KPM, HAS_BITS, PRESCALE, SOFTCAP, CAP_IN, CAP_OUT, FAST_TANH,
        )
        off += n

    if slot >= 0:
        rows = (slot.to(tl.int64) * NBG + bg) * BK + sub * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(SK + rows[:, None] * D + offs_d[None, :], dk)
        tl.store(SV + rows[:, None] * DV + offs_dv[None, :], dv)
    else:
        dk = dk * sm_scale
        tl.store(DK + b.to(tl.int64) * sdkb + hk.to(tl.int64) * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
                 dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
        tl.store(DV_ + b.to(tl.int64) * sdvb + hk.to(tl.int64) * sdvh + offs_n[:, None] * sdvn
                 + offs_dv[None, :] * sdvd, dv.to(DV_.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _slot(SK, SV, rows, offs_d, offs_dv, live, D: tl.constexpr, DV: tl.constexpr):
    """Rows ``rows`` of one scratch slot of SK ``[.., D]`` / SV ``[.., DV]``, zeros unless ``live``."""
    ok = (rows * 0 + live.to(tl.int64)) != 0
    k = tl.load(SK + rows[:, None] * D + offs_d[None, :], mask=ok[:, None], other=0.0)
    v = tl.load(SV + rows[:, None] * DV + offs_dv[None, :], mask=ok[:, None], other=0.0)
    return k, v


@triton.jit
def _dkdv_reduce_kernel(
    SK, SV, DK, DV_, RED,
    sdkb, sdkh, sdkn, sdkd,
    sdvb, sdvh, sdvn, sdvd,
    HG, NBG, Lk, sm_scale,
    BK: tl.constexpr, BLOCK_R: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
):
    """Grid ``(n_split_tiles * BK // BLOCK_R, B * HG)`` (small row blocks: many programs for little
    data, so that this serial step is short). ``RED`` int32 ``[n_split_tiles, 4]``:
    ``(th, kb, slot0, n)``: DK/DV rows of tile (kv head ``th + bg % HG``, key block ``kb``) =
    ``sum_{j < n}`` of scratch slot ``slot0 + j``, in that order (times ``sm_scale`` for DK)."""
    NSUB: tl.constexpr = BK // BLOCK_R
    pid = tl.program_id(0)
    tile = pid // NSUB
    sub = pid % NSUB
    bg = tl.program_id(1)
    b = bg // HG
    th = tl.load(RED + tile * 4)
    kb = tl.load(RED + tile * 4 + 1)
    slot0 = tl.load(RED + tile * 4 + 2)
    n = tl.load(RED + tile * 4 + 3)
    hk = th + bg % HG
    offs_r = sub * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    acc_k = tl.zeros([BLOCK_R, D], tl.float32)
    acc_v = tl.zeros([BLOCK_R, DV], tl.float32)
    rows = (slot0.to(tl.int64) * NBG + bg) * BK + offs_r  # slot j is ``j * NBG * BK`` rows further
    step = (slot0 * 0 + NBG).to(tl.int64) * BK  # (NBG may arrive as the constant 1)
    for j in range(0, n, 4):  # four loads in flight, then added in slot order (+0.0 past the end)
        k0, v0 = _slot(SK, SV, rows + j * step, offs_d, offs_dv, j < n, D, DV)
        k1, v1 = _slot(SK, SV, rows + (j + 1) * step, offs_d, offs_dv, j + 1 < n, D, DV)
        k2, v2 = _slot(SK, SV, rows + (j + 2) * step, offs_d, offs_dv, j + 2 < n, D, DV)
        k3, v3 = _slot(SK, SV, rows + (j + 3) * step, offs_d, offs_dv, j + 3 < n, D, DV)
        acc_k = (((acc_k + k0) + k1) + k2) + k3
        acc_v = (((acc_v + v0) + v1) + v2) + v3
    offs_n = kb * BK + offs_r
    ok = offs_n < Lk
    tl.store(DK + b.to(tl.int64) * sdkb + hk.to(tl.int64) * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
             (acc_k * sm_scale).to(DK.dtype.element_ty), mask=ok[:, None])
    tl.store(DV_ + b.to(tl.int64) * sdvb + hk.to(tl.int64) * sdvh + offs_n[:, None] * sdvn + offs_dv[None, :] * sdvd,
             acc_v.to(DV_.dtype.element_ty), mask=ok[:, None])
