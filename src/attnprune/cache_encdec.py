"""``PrunedKVCache`` for encoder-decoder models: a transformers ``EncoderDecoderCache`` whose two parts
hold only what the attached mask still reads.

* Self-attention (the decoder's causal sites): a :class:`~attnprune.cache.PrunedKVCache` over the
  decoder's layers, pruned exactly as for a decoder-only model (positions from the decoder side:
  ``decoder_attention_mask`` when given).
* Cross-attention: the encoder's keys and values never change and never move, so each layer keeps a
  *static subset* of them, chosen once, when the first decoder forward computes them: for each
  sequence and kv head ``g``, the encoder positions ``p`` (own positions, padding dropped) that some
  query head of ``g``'s group keeps in *some* row of the cross site's mask (rows ``0 .. q_len - 1``:
  every decoder length up to the calibrated one). This is exact for every later decoder row that may
  run at all: a row ``r < q_len`` reads only kept columns (a dropped column is read by no row of the
  group), and a row ``r >= q_len`` raises ``LengthError`` under ``beyond="error"`` and under
  ``"extend"`` alike (a cross-attention site has no length-free form to extend; ``"dense"`` is
  refused by the cache). Shorter decoders read the top-left part of the mask, a subset of it.

The first decoder forward attends over all the encoder's keys on the attached backend (as without a
cache); later forwards attend over the kept slots (``PrunedCrossLayer.attend``: PyTorch SDPA with each
head's kept positions as its boolean mask; empty slots hold position -1).

Not supported (``UnsupportedModelError``): models whose attention adds a relative position bias
computed by the model over the cache's slot indices (T5 and its family: ``has_relative_attention_bias``),
since a compacted cache would misplace it, and the T5 cross-attention merges the encoder padding mask
with that bias over the full encoder length. Use transformers' default cache there (masked attention
applies all the same).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin, EncoderDecoderCache

from .errors import UnsupportedModelError

__all__ = ["PrunedEncoderDecoderCache", "PrunedCrossLayer", "read_columns"]


def read_columns(site_mask, num_kv_heads: int) -> torch.Tensor:
    """bool ``[Hkv, k_len]``: the key positions that some row of some query head of each kv head's
    group keeps (a cross-attention key is read by some decoder query only if this holds)."""
    b = site_mask.block or 1
    keep = site_mask.keep  # [H, Q, K] tokens or [H, Qb, Kb] blocks
    H, rows, cols = keep.shape
    group = keep.reshape(num_kv_heads, H // num_kv_heads, rows, cols).any(1).any(1)  # [Hkv, cols]
    return group.repeat_interleave(b, dim=1)[:, :site_mask.k_len]


class PrunedCrossLayer(CacheLayerMixin):
    """One cross-attention layer of a :class:`PrunedEncoderDecoderCache`: ``keys`` / ``values``
    ``[B, Hkv, C, D]`` and ``pos`` ``[B, Hkv, C]`` (encoder positions, -1: an empty slot), where ``C``
    bounds, from the mask on the host, the columns any kv head keeps among the encoder's positions."""

    is_sliding = False
    is_compileable = False
    is_croppable = False
    cross = True  # apply._Patch routes calls over ``keys`` to ``attend``

    def __init__(self, cache, site_mask, self_layer):
        super().__init__()
        self.cache = weakref.proxy(cache)  # the self-attention PrunedKVCache (context, mask checks)
        self.site, self.site_mask = site_mask.name, site_mask
        self.self_layer = self_layer  # the PrunedLayer of the same decoder layer: its query positions
        self._cols = read_columns(site_mask, site_mask.info.num_kv_heads)  # [Hkv, K], CPU
        self._counts = self._cols.long().cumsum(1)  # kept columns below each position, per kv head
        self.pos: torch.Tensor | None = None
        self.S = 0  # the encoder's length (tensor index)
        self.held_before = 0  # > 0 once the subset is held: calls over ``keys`` are routed to attend
        self._dev_keep: dict = {}

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def bound(self, S: int) -> int:
        """Host int >= the kept columns of any (sequence, kv head) of an encoder of ``S`` tokens
        (own positions of a sequence are ``0 .. n - 1`` with ``n <= S``)."""
        K = self._counts.shape[1]
        if not K or not S:
            return 1
        return max(1, int(self._counts[:, min(S, K) - 1].max()))

    def update(self, key_states, value_states, *args, **kwargs):
        """The first decoder forward: hold the kept subset; return all keys for this call's attention."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, Hkv, S, D = key_states.shape
        ctx, _ = self.cache._context()
        own = ctx.own_positions(0, S, self.device)  # [B or 1, S]: encoder own positions, -1 padding
        own = own.expand(B, S)
        cols = self._cols.to(self.device)
        K = cols.shape[1]
        sel = cols[:, own.clamp(0, K - 1)].permute(1, 0, 2) & ((own >= 0) & (own < K))[:, None, :]  # [B, Hkv, S]
        C = min(S, self.bound(S))
        order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True)[..., :C]  # kept first, in order
        self.pos = torch.where(sel.gather(-1, order), own[:, None, :].expand(B, Hkv, S).gather(-1, order), -1)
        idx = order[..., None]
        self.keys = key_states.gather(2, idx.expand(B, Hkv, C, D))
        self.values = value_states.gather(2, idx.expand(B, Hkv, C, value_states.shape[-1]))
        self.S, self.held_before = S, C
        return key_states, value_states

    def decode_keep(self, device) -> torch.Tensor:
        t = self._dev_keep.get(device)
        if t is None:
            t = self._dev_keep[device] = self.site_mask.keep.to(device).contiguous()
        return t

    def attend(self, call, sm, beyond: str) -> torch.Tensor:
        """A decoder forward after the first: each query head attends to its group's kept slots that
        its row of the mask keeps (the encoder's padding is no slot)."""
        sl = self.self_layer
        q_end = call.positions.q_end
        q_end = sl.seen if q_end is None else q_end
        if not sm.check_length(q_end, 0, beyond):
            sm.length_free  # extend: a cross-attention site has none; LengthError naming the site
        b = sm.block or 1
        kp = self.pos  # [B, Hkv, C]
        B, Hkv, C = kp.shape
        q_pos = sl.q_pos  # [B or 1, Lq], >= 0
        Bq, n = q_pos.shape
        H = sm.info.num_heads
        G = H // Hkv
        keep = self.decode_keep(kp.device).view(Hkv, G, *sm.keep.shape[1:])  # [Hkv, G, Qt, Kt]
        hg = torch.arange(Hkv, device=kp.device)[None, :, None, None, None]
        hi = torch.arange(G, device=kp.device)[None, None, :, None, None]
        qi = (q_pos.clamp(max=sm.q_len - 1) // b).view(Bq, 1, 1, n, 1)
        ki = (kp.clamp(0, sm.k_len - 1) // b).view(B, Hkv, 1, 1, C)
        allowed = (keep[hg, hi, qi, ki] & (kp >= 0).view(B, Hkv, 1, 1, C)).reshape(B, H, n, C)
        out = F.scaled_dot_product_attention(call.q, call.k, call.v, attn_mask=allowed, scale=call.scale,
                                             enable_gqa=G > 1)
        return torch.where(allowed.any(-1, keepdim=True), out, 0.0)  # a row with nothing kept: 0

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.S, 0

    def get_seq_length(self, *args) -> int:
        return self.S

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.keys is not None:
            idx = indices.to(self.keys.device)
            self.keys, self.values, self.pos = (t.index_select(0, idx) for t in (self.keys, self.values, self.pos))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.keys is not None:
            self.keys, self.values, self.pos = (t.repeat_interleave(repeats, 0)
                                                for t in (self.keys, self.values, self.pos))

    def crop(self, tokens_to_remove: int) -> None:
        raise UnsupportedModelError("PrunedKVCache cannot be cropped (assisted / speculative decoding); "
                                    "use the default cache for it")

    def reset(self) -> None:
        self.keys = self.values = self.pos = None
        self.S = self.held_before = 0
        self.is_initialized = False

    def nbytes(self) -> tuple[int, int, int]:
        """(held: the most kept encoder positions of any (sequence, kv head), times B x Hkv; allocated:
        the tensors; dense: a default cache's, every encoder position) in bytes of keys and values."""
        if self.keys is None:
            return 0, 0, 0
        B, Hkv, C = self.pos.shape
        per = self.keys.shape[-1] * self.keys.element_size() + self.values.shape[-1] * self.values.element_size()
        kept = int((self.pos >= 0).sum(-1).max()) if C else 0
        return B * Hkv * kept * per, B * Hkv * C * per, B * Hkv * self.S * per


class _CrossCache(Cache):
    """The cross-attention part: one :class:`PrunedCrossLayer` per decoder layer."""

    def __init__(self, layers):
        super().__init__(layers=layers)

    def crop(self, max_length: int) -> None:
        raise UnsupportedModelError("PrunedKVCache cannot be cropped (assisted / speculative decoding); "
                                    "use the default cache for it")


class PrunedEncoderDecoderCache(EncoderDecoderCache):
    """What ``PrunedKVCache(model, mask)`` returns for an encoder-decoder model (see the module
    docstring): ``self_attention_cache`` a decoder-side ``PrunedKVCache``, ``cross_attention_cache``
    the static kept subsets of the encoder's keys and values. ``kv_bytes()`` reports both parts."""

    def __init__(self, model: nn.Module, mask):
        from .cache import PrunedKVCache

        _refuse_position_bias(model)
        self_cache = PrunedKVCache(model, mask, _decoder=True)
        cross = {}
        for name, module in model.named_modules():
            idx = getattr(module, "layer_idx", None)
            if isinstance(idx, int) and name in mask and mask.site(name).info.kind == "cross":
                cross[idx] = name
        n = len(self_cache.layers)
        missing = [i for i in range(n) if i not in cross]
        if missing:
            raise UnsupportedModelError(
                f"PrunedKVCache needs a cross-attention mask site for every decoder layer of the "
                f"encoder-decoder model; layers {missing[:5]} have none (is the mask for this model?)")
        layers = [PrunedCrossLayer(self_cache, mask.site(cross[i]), self_cache.layers[i]) for i in range(n)]
        self_cache._extra_layers = layers
        super().__init__(self_cache, _CrossCache(layers))
        self.model, self.mask = model, mask

    def crop(self, tokens_to_remove: int) -> None:
        self.self_attention_cache.crop(tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.self_attention_cache.batch_repeat_interleave(repeats)
        self.cross_attention_cache.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.self_attention_cache.batch_select_indices(indices)
        self.cross_attention_cache.batch_select_indices(indices)

    def kv_bytes(self) -> dict:
        """``{"self": ..., "cross": ..., "held", "allocated", "dense", "share"}``: the self-attention
        part as ``PrunedKVCache.kv_bytes``; the cross part's ``held`` the kept encoder positions,
        ``dense`` all of them (what the default cache holds); the totals over both."""
        own = self.self_attention_cache.kv_bytes()
        held = alloc = dense = 0
        for layer in self.cross_attention_cache.layers:
            h, a, d = layer.nbytes()
            held, alloc, dense = held + h, alloc + a, dense + d
        cross = {"held": held, "allocated": alloc, "dense": dense, "share": held / dense if dense else 0.0}
        tot = {k: own[k] + cross[k] for k in ("held", "allocated", "dense")}
        return {"self": own, "cross": cross, **tot, "share": tot["held"] / tot["dense"] if tot["dense"] else 0.0}


def _refuse_position_bias(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if getattr(module, "has_relative_attention_bias", False) or hasattr(module, "relative_attention_bias"):
            raise UnsupportedModelError(
                f"PrunedKVCache does not support {type(model).__name__}: its attention adds a relative "
                f"position bias ({name or type(module).__name__}) that the model computes over the cache's "
                f"slot indices, which a cache that drops entries would misplace. Generate with "
                f"transformers' default cache (the mask still applies), or with use_cache=False")
