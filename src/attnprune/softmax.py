"""Two variants of the attention softmax that transformers models use and SDPA cannot express.

* **Attention sinks** (gpt-oss, passed as ``s_aux``): each query head ``h`` has a learned logit ``s_h``
  in every row's denominator, ``p_j = exp(x_j) / (exp(s_h) + sum_i exp(x_i))`` over the row's
  attendable keys ``i``; the sink takes the rest of the mass and contributes no value. It is a
  parameter, not a position: a mask never prunes it, so under a mask the kept keys are renormalised
  among themselves and the sink, and a row with every key pruned gives 0.
* **Logit soft-capping** (Gemma 2, passed as ``softcap``): the scaled scores become
  ``c * tanh(x / c)`` before the attention mask is added.

These helpers are the dense form used where no kernel runs: the reference backend, ``observe``, the
capture path's fallback and pruned-cache decoding. The Triton kernels take sinks through their
log-sum-exp and capping inside their score computation (:mod:`attnprune.kernels.attention`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_ROWS_ELEMS = 1 << 25  # score entries per chunk of query rows in dense_attention


def softmax_with_sinks(scores: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Row softmax of ``scores [B, H, R, Lk]`` (masked entries ``-inf``) with the heads' sink logits
    ``sinks [H]`` in each denominator; None: the plain softmax. Rows with every entry ``-inf`` give 0
    with sinks (NaN without, as ``torch.softmax``)."""
    if sinks is None:
        return torch.softmax(scores, dim=-1)
    s = sinks.to(scores.dtype).reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    return torch.softmax(torch.cat([scores, s], dim=-1), dim=-1)[..., :-1]


def soft_cap(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """``softcap * tanh(scores / softcap)`` (None: ``scores`` unchanged): Gemma 2's logit capping."""
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def attendable(mask: torch.Tensor) -> torch.Tensor:
    """The entries an attention mask lets through: a bool mask itself, an additive one where it is above half its
    dtype's most negative value (``-inf`` and transformers' ``finfo.min`` hide an entry)."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def masked_scores(scores: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``scores [B, H, rows, Lk]`` with a 4-D ``attn_mask`` (bool: True = may attend, or additive float;
    None: no mask) applied: ``(scores + the additive mask, allowed bool [B or 1, H or 1, rows, Lk])``."""
    allowed = torch.ones(1, 1, *scores.shape[-2:], dtype=torch.bool, device=scores.device)
    if mask is None:
        return scores, allowed
    if mask.dtype == torch.bool:
        return scores, allowed & mask
    return scores + mask.to(scores.dtype), allowed & attendable(mask)


def key_range(mask_rows, is_causal: bool, s: int, e: int, Lk: int, g: int) -> tuple[int, int]:
    """``(c0, c1)``: the keys ``c0 <= j < c1`` that some query of rows ``s:e`` may attend, from SDPA's
    top-left causality (``j <= i``) and the rows' mask ``[..., rows | 1, Lk]`` (one host read); ``c0``
    rounded down to a multiple of ``g``. ``c0 >= c1``: no key at all."""
    c1 = min(Lk, e) if is_causal else Lk
    if mask_rows is None or mask_rows.shape[-1] != Lk:
        return 0, c1
    idx = attendable(mask_rows).reshape(-1, Lk)[:, :c1].any(0).nonzero()
    if idx.numel() == 0:
        return 0, 0
    return int(idx[0]) // g * g, int(idx[-1]) + 1


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                    is_causal: bool, scale: float | None, *, sinks: torch.Tensor | None = None,
                    softcap: float | None = None, dropout_p: float = 0.0, narrow: bool = False) -> torch.Tensor:
    """Softmax attention with sinks and / or soft-capping, differentiable (also in ``sinks``).

    q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]``; v: ``[B, Hkv, Lk, Dv]`` (``Hq`` a multiple of ``Hkv``);
    ``attn_mask``: None, bool (True = may attend) or additive float broadcastable to ``[B, Hq, Lq, Lk]``
    (entries at or below half the dtype's most negative value count as masked, the rest is added after
    capping); ``is_causal``: SDPA's top-left causal rule on top; ``sinks``: ``[Hq]`` logits;
    ``softcap``: the cap ``c``. Returns ``[B, Hq, Lq, Dv]`` in q's dtype, computed in float32 (float64
    for float64 inputs) over chunks of query rows, so memory holds one chunk's scores at a time. Rows
    with no attendable key give 0. ``dropout_p`` drops probabilities as the models' eager attention does.
    ``narrow``: each chunk scores only the keys its queries may attend (:func:`key_range`: one host read
    per chunk, so not for CUDA-graph capture); the result is the same.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    k, v = k.to(dt), v.to(dt)
    if Hkv != Hq:
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    mask = None if attn_mask is None else attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    step = max(1, _ROWS_ELEMS // max(1, B * Hq * Lk))
    outs = []
    for s in range(0, Lq, step):
        e = min(Lq, s + step)
        m = None if mask is None else (mask if mask.shape[-2] == 1 else mask[..., s:e, :])
        c0, c1 = key_range(m, is_causal, s, e, Lk, 1) if narrow else (0, Lk)
        if c0 >= c1:  # no key for these rows
            outs.append(v.new_zeros(B, Hq, e - s, v.shape[-1]))
            continue
        if m is not None and m.shape[-1] != 1:
            m = m[..., c0:c1]
        scores = soft_cap((q[:, :, s:e].to(dt) @ k[:, :, c0:c1].transpose(-1, -2)) * scale, softcap)
        scores, allowed = masked_scores(scores, m)
        if is_causal:
            allowed = allowed & (torch.arange(c0, c1, device=q.device)[None, :]
                                 <= torch.arange(s, e, device=q.device)[:, None])
        scores = scores.masked_fill(~allowed, float("-inf"))
        if sinks is None:  # rows with nothing attendable: 0, not NaN
            alive = allowed.expand_as(scores).any(-1, keepdim=True)
            probs = torch.softmax(scores.masked_fill(~alive, 0.0), dim=-1).masked_fill(~alive, 0.0)
        else:
            probs = softmax_with_sinks(scores, sinks)
        if dropout_p > 0.0:
            probs = F.dropout(probs, p=dropout_p, training=True)
        outs.append(probs @ v[:, :, c0:c1])
    return torch.cat(outs, dim=2).to(q.dtype) if outs else q.new_zeros(B, Hq, 0, v.shape[-1])
