"""observe: run a model over a dataset and accumulate its attention probabilities per site."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .capture import AttentionCall, intercept
from .errors import EmptyDatasetError, InvalidArgumentError, NonFiniteAttentionError
from .stats import AttentionStats

_CHUNK_ELEMS = 1 << 24  # probabilities computed at once per attention call (B * H * rows * Lk)


def observe(model: nn.Module, batches: Iterable, *, granularity: int = 1, progress: bool = True,
            description: str = "") -> AttentionStats:
    """Run ``model`` over ``batches`` and return the mean attention probability of every site.

    Args:
        model: any ``nn.Module`` whose attention goes through transformers' ``AttentionInterface`` or
            ``F.scaled_dot_product_attention`` / ``nn.MultiheadAttention``. Run in eval mode without
            gradients; its training mode is restored afterwards.
        batches: iterable of dicts of keyword arguments for ``model`` (``input_ids``,
            ``attention_mask``, ``decoder_input_ids`` ...) or of tensors (passed positionally).
            Tensors are moved to the model's device.
        granularity: 1 for token statistics, ``g`` for ``g x g`` block sums.
        progress: show a tqdm progress bar.
        description: stored in the stats (what the calibration data was).

    Probabilities are recomputed in float32 (float64 for float64 inputs) from the call's q, k,
    scale, masks and causality, exactly as softmax attention defines them. An entry is counted when
    its query is real and its key attendable: padded keys (masked out), causal-future keys and padded
    queries are neither counted nor averaged. A query is padding when the batch's 2-D
    ``attention_mask`` (``decoder_attention_mask`` for decoder-side sites of encoder-decoder batches)
    has length ``Lq`` and is 0 there, or when every key of its row is masked. Entries are counted at
    each token's own position in its sequence (the number of real tokens before it), so a sequence
    gives the same statistics left-padded in a batch as alone.

    Raises ``EmptyDatasetError`` (no batch, or nothing attendable), ``NoAttentionSitesError``,
    ``NonFiniteAttentionError`` (naming the site).
    """
    if not isinstance(granularity, int) or isinstance(granularity, bool) or granularity < 1:
        raise InvalidArgumentError(f"granularity must be a positive integer, got {granularity!r}")
    from tqdm.auto import tqdm

    stats = AttentionStats([], granularity, model_name=model_name(model), description=description)

    def handler(call: AttentionCall):
        stats.add_site(call.info)
        call.q_valid = call.positions.q_valid
        out = site_sums(call, granularity)
        if out is not None:
            stats.add(call.site, out[0], out[1], q_len=out[2], k_len=out[3])
        return None

    device = next((p.device for p in model.parameters()), None)
    was_training = model.training
    n = 0
    model.eval()
    try:
        with torch.no_grad(), intercept(model, handler):
            for batch in tqdm(batches, desc="observe", disable=not progress, unit="batch"):
                args, kwargs = _split(batch, device)
                stats.num_sequences += _batch_size(args, kwargs)
                model(*args, **kwargs)
                n += 1
    finally:
        model.train(was_training)
    if n == 0:
        raise EmptyDatasetError("observe got no batches: the dataset is empty")
    for site, info in stats.infos.items():
        if not stats.observed(site):
            stats.add(site, torch.zeros(info.num_heads, 0, 0), torch.zeros(0, 0), q_len=0, k_len=0)
    if not any(stats.count(s).sum() > 0 for s in stats.sites):
        raise EmptyDatasetError("the batches held no attendable position (all queries padding or masked)")
    return stats.to("cpu")


def site_sums(call: AttentionCall, g: int = 1):
    """Probability sums of one attention call on a ``g x g`` grid.

    Returns ``(prob_sum [H, Qg, Kg] float64, count [Qg, Kg] float64, q_len, k_len)`` trimmed to the
    last query / key position observed, or None when nothing in the call is observable.
    """
    q, k = call.q, call.k
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    k = k.to(dt)
    if k.shape[1] != H:
        k = k.repeat_interleave(H // k.shape[1], dim=1)
    scale = call.scale if call.scale is not None else 1.0 / math.sqrt(D)
    mask = call.attn_mask
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    Qg, Kg = -(-Lq // g), -(-Lk // g)
    psum = torch.zeros(H, Qg, Kg, dtype=torch.float64, device=q.device)
    cnt = torch.zeros(Qg, Kg, dtype=torch.float64, device=q.device)
    q_any = torch.zeros(Lq, dtype=torch.bool, device=q.device)
    k_any = torch.zeros(Lk, dtype=torch.bool, device=q.device)
    step = max(g, (_CHUNK_ELEMS // max(1, B * H * Lk)) // g * g)
    kpos = torch.arange(Lk, device=q.device)
    pos = call.positions
    for s in range(0, Lq, step):
        e = min(Lq, s + step)
        scores = (q[:, :, s:e].to(dt) @ k.transpose(-1, -2)) * scale
        allowed = torch.ones(1, 1, e - s, Lk, dtype=torch.bool, device=q.device)
        if mask is not None:
            ms = mask[..., s:e, :] if mask.shape[-2] != 1 else mask
            if ms.dtype == torch.bool:
                allowed = allowed & ms
            else:
                scores = scores + ms.to(dt)
                allowed = allowed & (ms > torch.finfo(ms.dtype).min / 2)
        if call.is_causal:
            allowed = allowed & (torch.arange(s, e, device=q.device)[:, None] >= kpos[None, :])
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        valid = allowed & allowed.any(-1, keepdim=True)
        if call.q_valid is not None:
            valid = valid & call.q_valid[:, None, s:e, None].to(q.device)
        valid = valid.expand(B, valid.shape[1], e - s, Lk)
        if bool((~torch.isfinite(probs) & valid).any()):
            raise NonFiniteAttentionError(
                f"attention probabilities at site {call.site!r} contain NaN or Inf; check the model's "
                "weights and inputs (an overflow in half precision is a common cause)")
        if pos is not None and not pos.simple:  # realign each sequence to its own positions
            _add_at_positions(psum, cnt, q_any, k_any, torch.where(valid, probs, 0.0), valid.any(1),
                              pos.q[:, s:e], pos.k, g)
            continue
        p = torch.where(valid, probs, 0.0).sum(0, dtype=torch.float64)  # [H, rows, Lk]
        c = valid.any(1).sum(0, dtype=torch.float64)  # [rows, Lk]
        q_any[s:e] |= c.sum(1) > 0
        k_any |= c.sum(0) > 0
        rows = -(-(e - s) // g)
        p = torch.nn.functional.pad(p, (0, Kg * g - Lk, 0, rows * g - (e - s)))
        c = torch.nn.functional.pad(c, (0, Kg * g - Lk, 0, rows * g - (e - s)))
        psum[:, s // g: s // g + rows] += p.view(H, rows, g, Kg, g).sum((2, 4))
        cnt[s // g: s // g + rows] += c.view(rows, g, Kg, g).sum((1, 3))
    if not bool(q_any.any()):
        return None
    ql = int(q_any.nonzero().max()) + 1
    kl = int(k_any.nonzero().max()) + 1
    qb, kb = -(-ql // g), -(-kl // g)
    return psum[:, :qb, :kb], cnt[:qb, :kb], ql, kl


def _add_at_positions(psum, cnt, q_any, k_any, p, c, q_pos, k_pos, g: int) -> None:
    """Add probabilities ``p [B, H, rows, Lk]`` and counts ``c [B, rows, Lk]`` (zero where not observed)
    at each sequence's own positions ``q_pos [B or 1, rows]`` x ``k_pos [B or 1, Lk]`` of the ``g``-grid
    accumulators ``psum [H, Qg, Kg]`` / ``cnt [Qg, Kg]``; marks ``q_any [Lq]`` / ``k_any [Lk]`` at them."""
    H, Kg = psum.shape[0], psum.shape[2]
    for b in range(p.shape[0]):
        qp, kp = q_pos[min(b, q_pos.shape[0] - 1)], k_pos[min(b, k_pos.shape[0] - 1)]
        idx = ((qp // g)[:, None] * Kg + (kp // g)[None, :]).reshape(-1)
        psum.view(H, -1).index_add_(1, idx, p[b].reshape(H, -1).to(torch.float64))
        cb = c[b].to(torch.float64)
        cnt.view(-1).index_add_(0, idx, cb.reshape(-1))
        seen = cb > 0
        q_any[qp[seen.any(1)]] = True
        k_any[kp[seen.any(0)]] = True


def _split(batch, device) -> tuple[tuple, dict]:
    def move(x):
        return x.to(device) if isinstance(x, torch.Tensor) and device is not None else x

    if isinstance(batch, Mapping):
        return (), {key: move(v) for key, v in batch.items()}
    if isinstance(batch, torch.Tensor):
        return (move(batch),), {}
    if isinstance(batch, (tuple, list)) and all(isinstance(x, torch.Tensor) for x in batch):
        return tuple(move(x) for x in batch), {}
    raise InvalidArgumentError(f"a batch must be a dict of model keyword arguments or a tensor, "
                               f"got {type(batch).__name__}")


def _batch_size(args, kwargs) -> int:
    for x in list(args) + list(kwargs.values()):
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            return int(x.shape[0])
    return 0


def model_name(model: nn.Module) -> str:
    """Architecture class name and sizes, e.g. ``LlamaForCausalLM(layers=2, heads=4, kv_heads=2, hidden=32)``."""
    cfg = getattr(model, "config", None)
    fields = (("layers", ("num_hidden_layers", "n_layer", "num_layers", "encoder_layers")),
              ("decoder_layers", ("decoder_layers",)),
              ("heads", ("num_attention_heads", "n_head", "encoder_attention_heads")),
              ("decoder_heads", ("decoder_attention_heads",)),
              ("kv_heads", ("num_key_value_heads",)),
              ("hidden", ("hidden_size", "n_embd", "d_model")))
    parts = []
    if cfg is not None:
        for label, keys in fields:
            val = next((getattr(cfg, key) for key in keys if isinstance(getattr(cfg, key, None), int)), None)
            if val is not None:
                parts.append(f"{label}={val}")
    else:
        parts.append(f"params={sum(p.numel() for p in model.parameters())}")
    return f"{type(model).__name__}({', '.join(parts)})"
