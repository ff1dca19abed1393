"""``backend="reference"``: dense masked attention on any device, exact and differentiable."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import MaskMismatchError
from ..softmax import masked_scores, soft_cap, softmax_with_sinks
from . import BACKENDS


@BACKENDS.register("reference")
def reference_backend(q, k, v, site_mask, *, attn_mask=None, is_causal=False, scale=None, dropout_p=0.0,
                      q_offset=0, beyond="error", positions=None, sinks=None, softcap=None):
    """Masked softmax attention computed densely.

    q: ``[B, Hq, Lq, D]``, k: ``[B, Hkv, Lk, D]``, v: ``[B, Hkv, Lk, Dv]`` -> ``[B, Hq, Lq, Dv]``.
    Kept entries are ``site_mask.keep_tokens(Lq, Lk, q_offset=q_offset, beyond=beyond)`` intersected
    with ``attn_mask`` (bool) and causality (``j <= i + q_offset``); with ``positions = (q_pos, k_pos)``
    (long ``[B or 1, Lq]`` / ``[B or 1, Lk]`` or ``[B or 1, Hkv, Lk]`` per key/value head) entry
    ``(i, j)`` of sequence ``b`` is the mask's entry ``(q_pos[b, i], k_pos[b, j])`` instead, keys at
    negative positions (empty slots) are never attended, and causality is ``k_pos <= q_pos``. An additive float ``attn_mask`` is
    added to the scores, its entries at or below half the dtype's most negative value (``-inf``, ``finfo.min``)
    counting as masked. Every other entry is exactly ``-inf`` before the softmax, so the kept ones
    are renormalised among themselves. Rows with no finite score left return 0 (and 0 gradients).
    ``sinks``: ``[Hq]`` sink logits counted in every row's denominator; ``softcap``: scores capped to
    ``c * tanh(x / c)`` before the mask (:mod:`attnprune.softmax`); None: neither.
    Half-precision inputs are computed in float32 and cast back.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise MaskMismatchError(f"{Hq} query heads are not a multiple of {Hkv} key/value heads")
    if site_mask.info.num_heads != Hq:
        raise MaskMismatchError(f"site {site_mask.info.name!r}: the mask has {site_mask.info.num_heads} heads, "
                                f"the model {Hq}")
    if positions is None:
        keep = site_mask.keep_tokens(Lq, Lk, device=q.device, q_offset=q_offset, beyond=beyond)[None]
    else:
        q_pos, k_pos = (p.to(q.device) for p in positions)
        keep = site_mask.keep_at(q_pos, k_pos, beyond=beyond)
    dt = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32
    if Hkv != Hq:
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    scores = soft_cap((q.to(dt) @ k.to(dt).transpose(-1, -2)) * scale, softcap)
    # an additive mask's entries at or below half the dtype's most negative value hide their entry (as the
    # capture path and the kernels read masks: transformers use finfo.min, not -inf); the rest is a bias
    scores, attendable = masked_scores(scores, attn_mask)
    allowed = keep & attendable
    if is_causal and positions is None:
        i = torch.arange(Lq, device=q.device)[:, None]
        allowed = allowed & (torch.arange(Lk, device=q.device)[None, :] <= i + q_offset)
    if positions is not None:
        kp = (k_pos[:, None] if k_pos.dim() == 2 else k_pos.repeat_interleave(Hq // k_pos.shape[1], 1))[:, :, None, :]
        allowed = allowed & (kp >= 0)  # negative key positions: empty slots
        if is_causal:
            allowed = allowed & (kp <= q_pos[:, None, :, None])
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:  # the sink keeps every row's denominator positive: an empty row gives 0 by itself
        probs = softmax_with_sinks(scores, sinks)
    else:
        alive = (scores > float("-inf")).any(-1, keepdim=True)
        probs = torch.softmax(scores.masked_fill(~alive, 0.0), dim=-1).masked_fill(~alive, 0.0)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return (probs @ v.to(dt)).to(q.dtype)
