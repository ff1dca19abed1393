"""Block-sparse attention in plain PyTorch ops, on any device (CPU, MPS, CUDA without Triton).

:func:`gather_attention` computes what :func:`attnprune.kernels.sparse_attention` computes, with the same
layout (:class:`BlockLayout`) and arguments, but without Triton: for each chunk of query blocks it gathers the
key / value blocks each (head, query block) keeps into a dense ``[kept blocks x block]`` strip and runs batched
matmuls over those strips only. The work is proportional to the longest kept-block list of each chunk (not to
the whole key length), so a 90%-sparse layout costs about a tenth of dense attention's matmuls when the rows
keep similar numbers of blocks (sink + band layouts do; a layout whose rows differ widely pays for its longest
row in each chunk). It is exact: partly kept blocks read their token bitmasks, and causality, key padding,
attention sinks and logit capping are applied per element. Gradients come from autograd (memory: one chunk's
scores and the gathered strips are kept for the backward).

Scores are computed in float32 (float64 for float64 inputs), as the reference backend does.
"""

from __future__ import annotations

import torch

from ..errors import InvalidArgumentError
from ..softmax import soft_cap, softmax_with_sinks
from ._inputs import _check_shapes, _key_padding_mask, _scale
from .layout import BlockLayout, _unpack_bits

__all__ = ["gather_attention"]

# scores of one chunk (float32 elements) held at a time; the chunk is at least one query block
CHUNK_ELEMENTS = 1 << 25


def _tables(layout: BlockLayout, device: torch.device) -> dict:
    """Per (layout head, query block): the kept key blocks ``idx [H, Qb, K]`` (padded with 0), their bitmask
    codes ``code [H, Qb, K]`` (-1: fully kept; padded with -1) and counts ``count [H, Qb]``, on ``device``;
    built on the CPU (every op there exists on every backend) once per layout and device (``layout._cache``)."""
    hit = layout._cache.get(("gather", device))
    if hit is None:
        orig, layout = layout, layout.to("cpu")
        H, Qb = layout.num_heads, layout.q_blocks
        rows = H * Qb
        count = torch.bincount(layout.row, minlength=rows)
        kmax = int(count.max()) if layout.nnz else 0
        start = torch.cumsum(count, 0) - count
        slot = torch.arange(layout.nnz, device=layout.device) - start[layout.row]
        idx = torch.zeros(rows, max(kmax, 1), dtype=torch.long, device=layout.device)
        code = torch.full((rows, max(kmax, 1)), -1, dtype=torch.long, device=layout.device)
        idx[layout.row, slot] = layout.col.long()
        code[layout.row, slot] = layout.code.long()
        hit = dict(idx=idx.view(H, Qb, -1), code=code.view(H, Qb, -1), count=count.view(H, Qb),
                   bits=_unpack_bits(layout.bits, layout.block[1]) if layout.num_partial else None)
        hit = {name: None if t is None else t.to(device) for name, t in hit.items()}
        orig._cache[("gather", device)] = hit
    return hit


def gather_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    causal: bool = False,
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,
    q_offset: int = 0,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention on the blocks ``layout`` keeps, in PyTorch ops (any device; differentiable).

    Args:
        q: ``[batch, q_heads, Lq, d]``; k: ``[batch, kv_heads, Lk, d]``; v: ``[batch, kv_heads, Lk, dv]``
            (``q_heads`` a multiple of ``kv_heads``); one floating dtype.
        layout: :class:`BlockLayout` with ``num_heads`` equal to ``q_heads`` or 1, covering ``Lq x Lk``.
        causal, q_offset: query ``i`` sees key ``j`` only if ``j <= i + q_offset``.
        scale: score scale, default ``1 / sqrt(d)``.
        key_padding: bool ``[batch, Lk]`` (True: a real key) or int key lengths ``[batch]``.
        sinks: optional ``[q_heads]`` attention-sink logits (in every row's denominator, no value).
        softcap: optional logit cap ``c``: scores ``c * tanh(q.k * scale / c)``.

    Returns:
        ``[batch, q_heads, Lq, dv]`` in ``q``'s dtype; a row with no allowed key is 0.
    """
    _check_shapes(q, k, v)
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    if not q.is_floating_point() or k.dtype != q.dtype or v.dtype != q.dtype:
        raise InvalidArgumentError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    bq, bk = layout.block
    Qb, Kb = -(-Lq // bq), -(-Lk // bk)
    if layout.num_heads not in (1, Hq) or layout.q_blocks < Qb or layout.k_blocks < Kb:
        raise InvalidArgumentError(f"layout ({layout.num_heads} heads, {layout.q_blocks} x {layout.k_blocks} blocks of "
                                   f"{bq} x {bk}) does not cover {Hq} heads of {Lq} x {Lk} tokens")
    if B == 0 or Lq == 0 or Lk == 0:
        return q.new_zeros(B, Hq, Lq, Dv)
    scale = _scale(scale, D)
    if softcap is not None and not float(softcap) > 0:
        raise InvalidArgumentError(f"softcap must be positive, got {softcap}")
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    tab = _tables(layout, dev)
    heads = torch.arange(Hq, device=dev) if layout.num_heads == Hq else torch.zeros(Hq, dtype=torch.long, device=dev)
    kv_of = torch.arange(Hq, device=dev) // (Hq // Hkv)
    pad = torch.nn.functional.pad
    qb = pad(q, (0, 0, 0, Qb * bq - Lq)).view(B, Hq, Qb, bq, D)
    kb = pad(k, (0, 0, 0, Kb * bk - Lk)).view(B, Hkv, Kb, bk, D)
    vb = pad(v, (0, 0, 0, Kb * bk - Lk)).view(B, Hkv, Kb, bk, Dv)
    real = torch.arange(Kb * bk, device=dev) < Lk  # [Kb*bk] keys inside the length
    kp = _key_padding_mask(key_padding, B, Lk, dev)  # int8 [B, Lk] or None
    if kp is not None:
        real = real[None] & pad(kp.bool(), (0, Kb * bk - Lk))
    real = real.expand(B, Kb * bk).reshape(B, Kb, bk)
    count = tab["count"][heads, :Qb]  # [Hq, Qb]
    widest = max(1, int(count.max()))
    step = max(1, CHUNK_ELEMENTS // max(1, B * Hq * bq * widest * bk))
    outs = []
    for q0 in range(0, Qb, step):
        q1 = min(Qb, q0 + step)
        outs.append(_chunk(qb[:, :, q0:q1], kb, vb, real, tab, heads, kv_of, count[:, q0:q1], q0, bq, bk, scale,
                           causal, q_offset, sinks, softcap, dt))
    out = torch.cat(outs, 2).reshape(B, Hq, Qb * bq, Dv)[:, :, :Lq]
    return out.to(q.dtype)


def _chunk(qc, kb, vb, real, tab, heads, kv_of, count, q0: int, bq: int, bk: int, scale: float, causal: bool,
           q_offset: int, sinks, softcap, dt):
    """Output ``[B, Hq, nq, bq, Dv]`` of query blocks ``q0 .. q0 + nq`` (``qc [B, Hq, nq, bq, D]``). Few passes
    over the scores (the CPU's memory bandwidth is what this path spends): one batched matmul, the mask filled in
    place, the softmax, the matmul with the values; empty rows are mended only when there are any."""
    B, Hq, nq = qc.shape[:3]
    dev, Dv = qc.device, vb.shape[-1]
    width = int(count.max())
    if width == 0:  # no kept block in these rows: zeros (a sink adds no value)
        return qc.new_zeros(B, Hq, nq, bq, Dv, dtype=dt)
    idx = tab["idx"][heads, q0:q0 + nq, :width]  # [Hq, nq, W] key blocks
    valid = torch.arange(width, device=dev) < count[..., None]  # [Hq, nq, W] (padding slots are not)
    n = B * Hq * nq
    kg = kb[:, kv_of[:, None, None], idx].to(dt).reshape(n, width * bk, -1)  # [n, W*bk, D]
    vg = vb[:, kv_of[:, None, None], idx].to(dt).reshape(n, width * bk, Dv)
    s = torch.bmm(qc.to(dt).reshape(n, bq, -1), kg.transpose(1, 2)).mul_(scale)  # [n, bq, W*bk]
    ok = (valid[..., None] & real[:, idx])[:, :, :, None]  # [B, Hq, nq, 1, W, bk]
    if tab["bits"] is not None:  # token bitmasks of partly kept blocks
        code = tab["code"][heads, q0:q0 + nq, :width]
        elem = tab["bits"][code.clamp(min=0)] | (code < 0)[..., None, None]  # [Hq, nq, W, bq, bk]
        ok = ok & elem.permute(0, 1, 3, 2, 4)[None]
    if causal:
        i = (q0 + torch.arange(nq, device=dev))[:, None] * bq + torch.arange(bq, device=dev)  # [nq, bq]
        j = idx[..., None] * bk + torch.arange(bk, device=dev)  # [Hq, nq, W, bk]
        ok = ok & (j[:, :, None] <= i[None, :, :, None, None] + q_offset)[None]
    ok = ok.expand(B, Hq, nq, bq, width, bk).reshape(n, bq, width * bk)
    if softcap is None:
        s = s.masked_fill_(~ok, float("-inf"))
    else:  # (tanh's backward reads its output: no in-place fill after it)
        s = soft_cap(s, softcap).masked_fill(~ok, float("-inf"))
    some = ok.any(-1, keepdim=True)  # [n, bq, 1]
    empty = not bool(some.all())
    if empty:  # rows with no allowed key: scores 0 instead of all -inf (no NaN), probabilities 0 below
        s = torch.where(some, s, torch.zeros((), dtype=dt, device=dev))
    if sinks is None:
        p = torch.softmax(s, -1)
    else:
        s4 = s.view(B, Hq, nq * bq, width * bk)
        p = softmax_with_sinks(s4, sinks.to(dev)).reshape(n, bq, width * bk)
    if empty:
        p = p * some
    return torch.bmm(p, vg).view(B, Hq, nq, bq, Dv)
