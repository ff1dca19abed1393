"""``PrunedKVCache``: a transformers KV cache that keeps only the keys and values a static mask still reads.

A static mask says, for each site and key/value head, which past positions any later query of
that head's group may attend to. Position ``p`` of kv head ``g`` is *last read* by row
``last[g, p] = max{r : keep[h, r, p]}`` over the query heads ``h`` of the group (and, for a layer
with a sliding window ``w``, no later than ``p + w - 1``). Once every query of a forward sits past
``last[g, p]``, no later query can read ``p``: before each update the layer drops such entries and
compacts what is left, per sequence and kv head, so the cache holds ``[B, Hkv, C, D]`` with ``C``
the largest number of live positions of any (sequence, head), plus their positions ``[B, Hkv, C]``
(-1: an empty slot). Dropped entries are marked empty at once and removed at the next compaction
(after the prompt and every ``COMPACT_EVERY`` steps: the only host synchronisation). Sink columns are
read by every row and stay; a local band's keys leave as the band moves on. Attention over the
compacted cache is PyTorch SDPA with each head's kept positions as its boolean mask; calls without
earlier cached entries (the prompt) run on the attached backend.

Usage::

    with attnprune.apply(model, mask):
        out = model.generate(ids, past_key_values=attnprune.PrunedKVCache(model, mask), max_new_tokens=64)
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from .errors import InvalidArgumentError, UnsupportedModelError

__all__ = ["PrunedKVCache", "last_reads"]

COMPACT_EVERY = 32  # decode steps between compactions of a layer (each costs one host sync)


def last_reads(site_mask, num_kv_heads: int, window: int | None = None, *, extend: bool = False,
               length: int | None = None) -> torch.Tensor:
    """long ``[Hkv, length]`` (default ``k_len``): the last query row that reads each key position
    (-1: none), over the query heads of each key/value head's group. ``extend``: rows past the
    calibrated length read by the mask's length-free form (sinks: forever, as a huge number); else
    positions past ``k_len`` are never read. With a sliding window, at most ``p + window - 1``."""
    b = site_mask.block or 1
    keep = site_mask.keep  # [H, Q, K] tokens or [H, Qb, Kb] blocks
    H, rows = keep.shape[0], keep.shape[1]
    G = H // num_kv_heads
    length = site_mask.k_len if length is None else length
    group = keep.reshape(num_kv_heads, G, rows, keep.shape[2]).any(1)  # [Hkv, rows, cols]
    seen = group.any(1)
    last_row = rows - 1 - group.flip(1).to(torch.int8).argmax(1)  # last row (block) reading each column
    last = torch.minimum((last_row + 1) * b - 1, torch.tensor(site_mask.q_len - 1))
    last = torch.where(seen, last, -1).repeat_interleave(b, dim=1)[:, :site_mask.k_len]
    last = torch.nn.functional.pad(last, (0, max(0, length - last.shape[1])), value=-1)[:, :length]
    if extend:
        lf = site_mask.length_free
        big = torch.iinfo(torch.long).max // 4
        grid_last = lf.last_row(torch.arange(length) // b)  # [H, length], grid rows
        tok_last = torch.where(grid_last >= big, big, (grid_last + 1) * b - 1)
        ext = torch.where(tok_last >= site_mask.q_len, tok_last, -1)  # only rows past the calibration
        last = torch.maximum(last, ext.reshape(num_kv_heads, G, length).max(1).values)
    if window is not None:
        last = torch.minimum(last, torch.arange(length) + window - 1)
    return last.long()


class PrunedLayer(CacheLayerMixin):
    """One layer of a :class:`PrunedKVCache` (see the module docstring)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, cache, site_mask, window: int | None):
        super().__init__()
        # a weak reference: no cache <-> layer cycle keeping the tensors alive until a gc pass
        self.cache = weakref.proxy(cache)
        self.site, self.window, self.site_mask = site_mask.name, window, site_mask
        self._extend = False
        self._last = last_reads(site_mask, site_mask.info.num_kv_heads, window)  # [Hkv, K], CPU first
        self.seen = 0  # tokens seen so far (cached + current)
        self.pos: torch.Tensor | None = None  # [B, Hkv, C] positions of the held entries, -1 empty
        self.held_before = 0  # entries held before the current update (0: a prompt call)
        self.new_pos: torch.Tensor | None = None  # [B or 1, n] positions of the current queries
        self._since_compact = 0  # updates since the last compaction
        self._last_n = 0  # tokens of the last update (> 1: a prompt, compact at the next)
        # keys / values / pos are views of the first C slots of these buffers, which have room
        # for later entries: an update writes its entries in place (no concatenation per step)
        self._kbuf = self._vbuf = self._pbuf = None

    def lazy_initialization(self, key_states, value_states) -> None:
        B, Hkv, _, D = key_states.shape
        self.device, self.dtype = key_states.device, key_states.dtype
        self._set(key_states.new_zeros(B, Hkv, 0, D), value_states.new_zeros(B, Hkv, 0, value_states.shape[-1]),
                  torch.zeros(B, Hkv, 0, dtype=torch.long, device=self.device), 0)
        self._last = self._last.to(self.device)
        self._heads = torch.arange(Hkv, device=self.device)[None, :, None]
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, Hkv, n, _ = key_states.shape
        ctx, beyond = self.cache._context()
        new = ctx.own_positions(self.seen, n, self.device)  # [B or 1, n]; -1 padding
        self._table(beyond == "extend", self.seen + n)
        self._evict(new)
        C = self.held_before = self.pos.shape[-1]
        if C + n > self._pbuf.shape[-1]:  # no room: a larger buffer (the prompt: exactly its size)
            self._set(self.keys, self.values, self.pos, C + n + (COMPACT_EVERY if C else 0))
        self._kbuf[:, :, C:C + n] = key_states
        self._vbuf[:, :, C:C + n] = value_states
        self._pbuf[:, :, C:C + n] = new[:, None, :]
        self._view(C + n)
        self.new_pos = new
        self.seen += n
        self._last_n = n
        return self.keys, self.values

    def _set(self, keys, values, pos, capacity: int) -> None:
        """Hold ``keys``/``values``/``pos`` (C slots) in buffers of ``capacity >= C`` slots."""
        C = pos.shape[-1]
        if capacity > C:
            kb = keys.new_empty(*keys.shape[:2], capacity, keys.shape[-1])
            vb = values.new_empty(*values.shape[:2], capacity, values.shape[-1])
            pb = pos.new_empty(*pos.shape[:2], capacity)
            kb[:, :, :C], vb[:, :, :C], pb[:, :, :C] = keys, values, pos
            keys, values, pos = kb, vb, pb
        self._kbuf, self._vbuf, self._pbuf = keys, values, pos
        self._view(C)

    def _view(self, C: int) -> None:
        self.keys, self.values, self.pos = self._kbuf[:, :, :C], self._vbuf[:, :, :C], self._pbuf[:, :, :C]

    def _table(self, extend: bool, need: int) -> None:
        """Make the last-read table cover positions ``< need`` (grown by doubling under extend)."""
        if extend != self._extend or (extend and need > self._last.shape[1]):
            length = max(need, 2 * self._last.shape[1]) if extend else None
            self._last = last_reads(self.site_mask, self.site_mask.info.num_kv_heads, self.window,
                                    extend=extend, length=length).to(self.device)
            self._extend = extend

    def _live(self, first: torch.Tensor) -> torch.Tensor:
        """bool [B, Hkv, C]: held entries that a query at position >= ``first [B or 1]`` may read."""
        big = torch.iinfo(torch.long).max
        K = self._last.shape[1]
        last = self._last[self._heads, self.pos.clamp(0, K - 1)]
        last = torch.where(self.pos >= K, big, last)  # past the table: LengthError decides
        return (self.pos >= 0) & (last >= first[:, None, None])

    def _evict(self, new: torch.Tensor) -> None:
        """Drop entries no query at or after this forward's first query can read: mark them empty
        (no host sync), and compact after a prompt and every ``COMPACT_EVERY`` updates (one sync)."""
        if self.pos.shape[-1] == 0:
            return
        first = torch.where(new >= 0, new, torch.iinfo(torch.long).max).min(-1).values  # [B or 1]
        live = self._live(first)
        self._since_compact += 1
        if self._last_n <= 1 and self._since_compact < COMPACT_EVERY:
            self.pos.masked_fill_(~live, -1)  # in place: the slots stay in the buffer
            return
        self._since_compact = 0
        keep = int(live.sum(-1).max())  # the one host sync, per layer and compaction
        order = torch.argsort((~live).to(torch.int8), dim=-1, stable=True)[..., :keep]
        pos = torch.where(live.gather(-1, order), self.pos.gather(-1, order), -1)
        idx = order[..., None]
        keys = self.keys.gather(2, idx.expand(*idx.shape[:-1], self.keys.shape[-1]))
        values = self.values.gather(2, idx.expand(*idx.shape[:-1], self.values.shape[-1]))
        # room for this update and the steps up to the next compaction
        self._set(keys, values, pos, keep + new.shape[-1] + COMPACT_EVERY)

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        held = 0 if self.pos is None else self.pos.shape[-1]
        return held + query_length, 0

    def get_seq_length(self, *args) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            idx = indices.to(self.device)
            C = self.pos.shape[-1]
            self._kbuf, self._vbuf, self._pbuf = (t.index_select(0, idx) for t in (self._kbuf, self._vbuf, self._pbuf))
            self._view(C)
            if self.new_pos is not None and self.new_pos.shape[0] > 1:
                self.new_pos = self.new_pos.index_select(0, idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            C = self.pos.shape[-1]
            self._kbuf, self._vbuf, self._pbuf = (t.repeat_interleave(repeats, 0)
                                                  for t in (self._kbuf, self._vbuf, self._pbuf))
            self._view(C)

    def crop(self, tokens_to_remove: int) -> None:
        raise UnsupportedModelError("PrunedKVCache cannot be cropped (assisted / speculative decoding); "
                                    "use the default cache for it")

    def reset(self) -> None:
        self.keys = self.values = self.pos = None
        self._kbuf = self._vbuf = self._pbuf = None
        self.is_initialized = False
        self.seen = self._since_compact = self._last_n = 0

    def nbytes(self) -> tuple[int, int, int]:
        """Bytes of keys and values: (kept for later steps: the entries a query at the next
        position may read, compacted as the next update will; allocated now; a dense cache's
        for the same tokens: all of them, or the last ``window - 1`` on a sliding layer)."""
        if not self.is_initialized:
            return 0, 0, 0
        B, Hkv = self.keys.shape[:2]
        per = self.keys.shape[-1] * self.keys.element_size() + self.values.shape[-1] * self.values.element_size()
        nxt = torch.full((1,), self.seen, dtype=torch.long, device=self.device)
        kept = int(self._live(nxt).sum(-1).max()) if self.pos.shape[-1] else 0
        dense = self.seen if self.window is None else min(self.seen, self.window - 1)
        return B * Hkv * kept * per, B * Hkv * self.pos.shape[-1] * per, B * Hkv * dense * per


class PrunedKVCache(Cache):
    """A transformers ``Cache`` keeping, per layer and key/value head, only the positions that a later
    query can still read under the attached mask (see the module docstring).

    Args:
        model: a decoder-only transformers model with ``mask`` attached (``attnprune.apply``, with
            ``beyond="error"`` or ``"extend"``) while the cache is used.
        mask: the attached ``PruneMask``.

    ``cache.kv_bytes()`` reports the bytes held against a dense cache's. Works with batches, left
    padding, greedy, sampling and beam search. Not supported (a clear error): encoder-decoder
    models, cropping (assisted decoding), ``beyond="dense"``.
    """

    def __init__(self, model: nn.Module, mask):
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            raise UnsupportedModelError("PrunedKVCache supports decoder-only models; an encoder-decoder "
                                        "model keeps its default cache")
        sites = {}
        for name, module in model.named_modules():
            idx = getattr(module, "layer_idx", None)
            if isinstance(idx, int) and name in mask and mask.site(name).info.kind == "causal":
                sites[idx] = (name, module)
        n = int(getattr(getattr(model, "config", None), "num_hidden_layers", 0) or 0) or len(sites)
        missing = [i for i in range(n) if i not in sites]
        if not sites or missing:
            raise UnsupportedModelError(
                f"PrunedKVCache needs a causal mask site for every attention layer of the model; layers "
                f"{missing[:5] or 'all'} have none (is the mask for this model?)")
        layers = []
        for i in range(n):
            name, module = sites[i]
            sm = mask.site(name)
            window = _window(model, module, i)
            layers.append(PrunedLayer(self, sm, window))
        super().__init__(layers=layers)
        self.model, self.mask = model, mask

    def _context(self):
        patch = _patch(self.model)
        if patch is None or patch.mask is not self.mask:
            raise InvalidArgumentError("PrunedKVCache(model, mask) is used while that mask is not attached "
                                       "to the model: run generate inside `with attnprune.apply(model, mask):`")
        if patch.beyond == "dense":
            raise InvalidArgumentError("PrunedKVCache needs beyond='error' or 'extend' (got 'dense'): past "
                                       "the calibrated length every key may be read again, so none could be dropped")
        patch.pruned_layers = {layer.site: layer for layer in self.layers}
        return patch.interceptor.context, patch.beyond

    def kv_bytes(self) -> dict:
        """Key and value bytes over all layers: ``held`` (kept for the next step: what a query at
        the next position may still read), ``allocated`` (the tensors right now, which also hold
        what the last step read), ``dense`` (what transformers' default cache keeps between steps
        for the same tokens) and ``share = held / dense``."""
        held = alloc = dense = 0
        for layer in self.layers:
            h, a, d = layer.nbytes()
            held, alloc, dense = held + h, alloc + a, dense + d
        return {"held": held, "allocated": alloc, "dense": dense, "share": held / dense if dense else 0.0}


def _patch(model):
    from .apply import _ATTACHED

    return _ATTACHED.get(model)


def _window(model, module, idx: int) -> int | None:
    """The sliding window of layer ``idx`` (None: full attention), as transformers configures it."""
    w = getattr(module, "sliding_window", None)
    if isinstance(w, int):
        return w
    cfg = getattr(model, "config", None)
    w = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if not isinstance(w, int):
        return None
    if types is not None:
        return w if types[idx] == "sliding_attention" else None
    return w if getattr(cfg, "use_sliding_window", True) else None
