"""observe: run a model over a dataset and accumulate its attention probabilities per site."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .capture import AttentionCall, intercept
from .errors import EmptyDatasetError, InvalidArgumentError, NonFiniteAttentionError
from .softmax import dense_attention, key_range, masked_scores, soft_cap, softmax_with_sinks
from .stats import SCORES, AttentionStats  # noqa: F401 - SCORES re-exported: prob, value, influence, loss

_CHUNK_ELEMS = 1 << 24  # probabilities computed at once per attention call (B * H * rows * Lk)


_GRADIENT_SCORES = {"influence": True, "loss": False}  # need the outputs' gradients; True: absolute value


def observe(model: nn.Module, batches: Iterable, *, granularity: int = 1, progress: bool = True,
            description: str = "", score: str = "prob") -> AttentionStats:
    """Run ``model`` over ``batches`` and return the mean score of every attention entry of every site.

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
        score: what is accumulated per entry (recorded in ``stats.score``; policies rank by its mean):

            * ``"prob"`` (default, the paper's): the attention probability ``p_ij``.
            * ``"value"``: ``p_ij * ||v_j||``, the probability times the L2 norm of the key's value
              vector (its kv head's), i.e. the magnitude of the entry's contribution to the output.
            * ``"influence"``: the absolute first-order change of the loss when the entry is removed
              from its row and the row renormalised (MoA-style). With ``g = dL/dp`` for the row's
              probabilities ``p``, removing ``j`` gives ``p'_i = p_i / (1 - p_j)`` (``i != j``),
              ``p'_j = 0``, so ``dp_i = p_i p_j / (1 - p_j)`` and ``dp_j = -p_j``; to first order
              ``dL = sum_i g_i dp_i = p_j / (1 - p_j) * (sum_i p_i g_i - g_j)``, and to first order
              in ``p_j``: ``dL ~= p_j * (sum_i p_i g_i - g_j)``. Since the row's output is
              ``o = sum_j p_j v_j``, ``g_j = do . v_j`` and ``sum_i p_i g_i = do . o`` with ``do = dL/do``,
              so ``|p_j do . (o - v_j)|`` is accumulated: only the attention *outputs'* gradients are
              needed, not a probability tensor per layer. ``L`` is the batch's *summed* next-token NLL
              (``input_ids`` shifted, or the batch's ``labels``; ``-100`` and padding ignored), so an
              entry's score is the change of its own sequence's total loss, independent of batching.
              Each batch runs forward (attention through ``scaled_dot_product_attention``, memory
              ``O(L)`` per layer as in training) and backward to the attention outputs
              (``torch.autograd.grad``; parameters get no ``.grad``); the probabilities are then
              recomputed in float32 chunks as for ``"prob"``. Cost: about 3x a forward. Needs a causal
              LM returning logits ``[batch, seq, vocab]`` that match ``input_ids``.
            * ``"loss"``: the same first-order loss change *with its sign*,
              ``p_j do . (o - v_j)``: its mean over the calibration data is the expected loss increase of
              removing the entry, and a block's sum is the first-order change of removing the whole
              block (magnitudes of entries that help and hurt do not add up, as with ``"influence"``).
              Negative where removing the entry lowers the loss; policies keep the highest first.
            * ``"ablation"``: not per entry but per head, measured: the loss increase of restricting each
              head alone to sink columns and a band of ``k`` block diagonals, for a grid of ``k``, spread
              over the blocks (``granularity >= 2`` is the block side; many forwards per batch, see
              :func:`attnprune.ablation.measure_bands`, which this calls with its defaults).
    Probabilities are recomputed in float32 (float64 for float64 inputs) from the call's q, k,
    scale, masks and causality, exactly as the model's attention defines them (logit soft-capping
    included; attention sinks in the denominators: the sink's share is not an entry, so such rows sum
    to less than 1). An entry is counted when its query is real and its key attendable: padded keys
    (masked out), causal-future keys and padded queries are neither counted nor averaged. A query is
    padding when the batch's 2-D ``attention_mask`` (``decoder_attention_mask`` for decoder-side sites
    of encoder-decoder batches) has length ``Lq`` and is 0 there, or when every key of its row is
    masked. Entries are counted at each token's own position in its sequence (the number of real
    tokens before it), so a sequence gives the same statistics left-padded in a batch as alone.

    Raises ``EmptyDatasetError`` (no batch, or nothing attendable), ``NoAttentionSitesError``,
    ``NonFiniteAttentionError`` (naming the site).
    """
    if not isinstance(granularity, int) or isinstance(granularity, bool) or granularity < 1:
        raise InvalidArgumentError(f"granularity must be a positive integer, got {granularity!r}")
    if score not in SCORES:
        raise InvalidArgumentError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    if score == "ablation":
        from .ablation import measure_bands
        return measure_bands(model, batches, granularity=granularity, progress=progress, description=description)
    from tqdm.auto import tqdm

    stats = AttentionStats([], granularity, model_name=model_name(model), description=description,
                           score=score)
    pending: list = []  # influence: (call, differentiable probabilities) of the running forward

    def add(call, out):
        if out is not None:
            stats.add(call.site, out[0], out[1], q_len=out[2], k_len=out[3])

    def handler(call: AttentionCall):
        stats.add_site(call.info)
        call.q_valid = call.positions.q_valid
        if score in _GRADIENT_SCORES:
            out = attention_output(call)
            pending.append((call, out))
            return out
        add(call, site_sums(call, granularity, values=_value_weighted(call) if score == "value" else None))
        return None

    device = next((p.device for p in model.parameters()), None)
    was_training = model.training
    params = [p for p in model.parameters() if p.is_floating_point()]
    flags = [p.requires_grad for p in params]
    n = 0
    model.eval()
    try:
        if score in _GRADIENT_SCORES:  # the graph must reach the first layer; no parameter gets a .grad
            for p in params:
                p.requires_grad_(True)
        grad_mode = torch.enable_grad() if score in _GRADIENT_SCORES else torch.no_grad()
        with grad_mode, intercept(model, handler):
            for batch in tqdm(batches, desc="observe", disable=not progress, unit="batch"):
                args, kwargs = _split(batch, device)
                stats.num_sequences += _batch_size(args, kwargs)
                pending.clear()
                out = model(*args, **kwargs)
                if score in _GRADIENT_SCORES and pending:
                    loss = lm_loss_sum(out, args, kwargs)
                    grads = torch.autograd.grad(loss, [o for _, o in pending], allow_unused=True)
                    with torch.no_grad():
                        for (call, _), g in zip(pending, grads):
                            add(call, site_sums(call, granularity,
                                                values=_influence_of(call, g, _GRADIENT_SCORES[score])))
                    del loss, grads, out
                    pending.clear()
                n += 1
    finally:
        pending.clear()
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        model.train(was_training)
    if n == 0:
        raise EmptyDatasetError("observe got no batches: the dataset is empty")
    for site, info in stats.infos.items():
        if not stats.observed(site):
            stats.add(site, torch.zeros(info.num_heads, 0, 0), torch.zeros(0, 0), q_len=0, k_len=0)
    if not any(stats.count(s).sum() > 0 for s in stats.sites):
        raise EmptyDatasetError("the batches held no attendable position (all queries padding or masked)")
    return stats.to("cpu")


def influence(p: torch.Tensor, g: torch.Tensor | None, absolute: bool = True) -> torch.Tensor:
    """``|p_j * (sum_i p_i g_i - g_j)|`` per entry (``absolute=False``: without the absolute value): the
    first-order loss change of removing entry ``j`` from its row and renormalising (see ``observe``).
    ``p``, ``g = dL/dp``: ``[..., Lk]`` (``g`` None: zeros)."""
    if g is None:
        return torch.zeros_like(p)
    g = g.to(p.dtype)
    d = p * ((p * g).sum(-1, keepdim=True) - g)
    return d.abs() if absolute else d


def _influence_of(call: AttentionCall, d_out: torch.Tensor | None, absolute: bool = True):
    """``values`` for ``site_sums``: ``influence(p, g)`` with ``g_j = do . v_j`` from the gradient
    ``d_out = dL/do [B, Hq, Lq, Dv]`` of the call's output (None: the output did not reach the loss)."""
    dt = torch.float64 if call.q.dtype == torch.float64 else torch.float32
    H = call.q.shape[1]
    v = call.v.detach().to(dt)
    if v.shape[1] != H:
        v = v.repeat_interleave(H // v.shape[1], dim=1)

    def values(s: int, e: int, probs: torch.Tensor, c0: int = 0, c1: int | None = None) -> torch.Tensor:
        if d_out is None:
            return torch.zeros_like(probs)
        do = d_out[:, :, s:e].to(dt)
        return influence(probs, do @ v[:, :, c0:c1].transpose(-1, -2), absolute)
    return values


def attention_output(call: AttentionCall) -> torch.Tensor:
    """The call's softmax attention ``[B, Hq, Lq, Dv]`` through ``scaled_dot_product_attention``,
    differentiable, memory ``O(L)`` where the backend allows; rows with no attendable key give 0
    (as ``explicit_attention``), with no NaN in the forward or the backward. Dropout is not applied."""
    q, k, v = call.q, call.k, call.v
    if call.sinks is not None or call.softcap is not None:
        return dense_attention(q, k, v, call.attn_mask, call.is_causal, call.scale, sinks=call.sinks,
                               softcap=call.softcap, narrow=True)
    Lq, Lk = q.shape[-2], k.shape[-2]
    gqa = k.shape[1] != q.shape[1]
    mask = call.attn_mask
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=call.is_causal, scale=call.scale, enable_gqa=gqa)
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    _, allowed = masked_scores(torch.zeros(1, 1, Lq, Lk, device=q.device), mask)
    if call.is_causal:
        allowed = allowed & torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril()
    none = ~allowed.any(-1, keepdim=True)  # such rows attend to every key, then are zeroed
    if mask.dtype == torch.bool:
        m = allowed | none
    else:
        m = mask.to(q.dtype).masked_fill(~allowed, float("-inf")).masked_fill(none, 0.0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=call.scale, enable_gqa=gqa)
    return out.masked_fill(none, 0.0)


def explicit_attention(call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``call`` computed explicitly and differentiably, in float32 (float64 for
    float64 inputs): ``(output [B, Hq, Lq, Dv] in q's dtype, probabilities [B, Hq, Lq, Lk])``.
    Rows with no attendable key get zero probabilities (and a zero output). Dropout is not applied."""
    q, k, v = call.q, call.k, call.v
    H, D = q.shape[1], q.shape[-1]
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    k, v = k.to(dt), v.to(dt)
    if k.shape[1] != H:
        k = k.repeat_interleave(H // k.shape[1], dim=1)
        v = v.repeat_interleave(H // v.shape[1], dim=1)
    scale = call.scale if call.scale is not None else 1.0 / math.sqrt(D)
    scores = soft_cap((q.to(dt) @ k.transpose(-1, -2)) * scale, call.softcap)
    Lq, Lk = scores.shape[-2:]
    mask = call.attn_mask
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    scores, allowed = masked_scores(scores, mask)
    if call.is_causal:
        allowed = allowed & torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril()
    none = ~allowed.any(-1, keepdim=True)
    scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(none, 0.0)
    probs = softmax_with_sinks(scores, call.sinks) * (~none).to(dt)
    return (probs @ v).to(call.q.dtype), probs


def lm_loss_sum(out, args, kwargs) -> torch.Tensor:
    """Differentiable summed next-token NLL of a batch (as ``evaluate.token_nll`` counts it)."""
    from .ablation import lm_nll

    return lm_nll(out, args, kwargs)[0].sum()


def _value_weighted(call: AttentionCall):
    """``values`` for ``site_sums``: probabilities times each key's value norm (its kv head's)."""
    v = call.v
    dt = torch.float64 if call.q.dtype == torch.float64 else torch.float32
    norm = v.to(dt).norm(dim=-1)  # [B, Hkv, Lk]
    H = call.q.shape[1]
    if norm.shape[1] != H:
        norm = norm.repeat_interleave(H // norm.shape[1], dim=1)
    norm = norm[:, :, None, :]
    return lambda s, e, probs, c0=0, c1=None: probs * norm[..., c0:c1]


def site_sums(call: AttentionCall, g: int = 1, values=None):
    """Probability sums (or other per-entry scores) of one attention call on a ``g x g`` grid.

    values: None to sum the probabilities, or ``values(s, e, probs, c0, c1)`` giving the scores
    ``[B, H, e - s, c1 - c0]`` of query rows ``s:e`` and keys ``c0:c1`` to sum instead (``probs``: those
    entries' probabilities, 0 where not observed).
    Returns ``(sum [H, Qg, Kg] float64, count [Qg, Kg] float64, q_len, k_len)`` trimmed to the
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
    simple = pos is None or pos.simple
    for s in range(0, Lq, step):
        e = min(Lq, s + step)
        ms = None if mask is None else (mask[..., s:e, :] if mask.shape[-2] != 1 else mask)
        # only the keys some query of these rows may attend (causal: about half of them; a sliding window: the
        # window): the scores of the rest would be -inf, contributing nothing to the softmax or the sums
        c0, c1 = key_range(ms, call.is_causal, s, e, Lk, g) if simple else (0, Lk)
        if c0 >= c1:
            continue
        w = c1 - c0
        scores = soft_cap((q[:, :, s:e].to(dt) @ k[:, :, c0:c1].transpose(-1, -2)) * scale, call.softcap)
        scores, allowed = masked_scores(scores, ms if ms is None or ms.shape[-1] == 1 else ms[..., c0:c1])
        if call.is_causal:
            allowed = allowed & (torch.arange(s, e, device=q.device)[:, None] >= kpos[None, c0:c1])
        probs = softmax_with_sinks(scores.masked_fill(~allowed, float("-inf")), call.sinks)
        rows_ok = allowed.any(-1, keepdim=True)
        if call.q_valid is not None:
            rows_ok = rows_ok & call.q_valid[:, None, s:e, None].to(q.device)
        valid = (allowed & rows_ok).expand(B, max(allowed.shape[1], rows_ok.shape[1]), e - s, w)
        probs = probs.masked_fill(~valid, 0.0)  # unobserved entries out (rows with nothing allowed: NaN)
        # a non-finite valid entry makes the sum non-finite (probabilities are at most 1: no overflow)
        if not bool(torch.isfinite(probs.sum())):
            raise NonFiniteAttentionError(
                f"attention probabilities at site {call.site!r} contain NaN or Inf; check the model's "
                "weights and inputs (an overflow in half precision is a common cause)")
        if values is not None:
            probs = values(s, e, probs, c0, c1).to(probs.dtype).masked_fill(~valid, 0.0)
            if not bool(torch.isfinite(probs.abs().sum(dtype=torch.float64))):
                raise NonFiniteAttentionError(f"attention scores at site {call.site!r} contain NaN or Inf")
        if not simple:  # realign each sequence to its own positions
            _add_at_positions(psum, cnt, q_any, k_any, probs, valid.any(1), pos.q[:, s:e], pos.k, g)
            continue
        seen = valid.any(1)  # [B, rows, w]: the entry is observed in some head
        q_any[s:e] |= seen.any(0).any(1)
        k_any[c0:c1] |= seen.any(0).any(0)
        rows, kc = -(-(e - s) // g), -(-w // g)
        grow = (0, kc * g - w, 0, rows * g - (e - s))  # to whole g x g cells; sums over batch and cell in float64
        p = torch.nn.functional.pad(probs, grow).view(B, H, rows, g, kc, g).sum((0, 3, 5), dtype=torch.float64)
        c = torch.nn.functional.pad(seen, grow).view(B, rows, g, kc, g).sum((0, 2, 4), dtype=torch.float64)
        psum[:, s // g: s // g + rows, c0 // g: c0 // g + kc] += p
        cnt[s // g: s // g + rows, c0 // g: c0 // g + kc] += c
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
