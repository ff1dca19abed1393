"""``PrunedKVCache``: a transformers KV cache that keeps only the keys and values a static mask still reads.

A static mask says, for each site and key/value head, which past positions any later query of
that head's group may attend to. Position ``p`` of kv head ``g`` is *last read* by row
``last[g, p] = max{r : keep[h, r, p]}`` over the query heads ``h`` of the group (and, for a layer
with a sliding window ``w``, no later than ``p + w - 1``). Once every query of a forward sits past
``last[g, p]``, no later query can read ``p``. The layer holds ``[B, Hkv, C, D]`` keys and values
plus their positions ``[B, Hkv, C]`` (-1: an empty slot) in buffers with room for later tokens.

A decode step (one token per sequence) writes its entry into the next free slot: three copies per
layer, no other op and no host synchronisation; its positions are computed once per forward and
shared by all layers. Entries that can no longer be read stay until the next compaction: the
attention masks them out anyway (no query at or after their last row keeps them). Every
``COMPACT_EVERY`` steps (and after the prompt, or when the room is used up) a layer drops them,
packing what is left per sequence and kv head in order, into a buffer of ``S + n + COMPACT_EVERY``
slots where ``S`` bounds the live entries of any (sequence, head): the largest number of positions
``p < m <= last[g, p]`` over heads and ``m`` up to the step's position, read from the mask on the
host, so compaction needs no synchronisation either. Sink columns are read by every row and stay;
a local band's keys leave as the band moves on. Attention over the cache is ``masked_decode``
(CUDA) or PyTorch SDPA with each head's kept positions as its boolean mask (``apply._Patch``);
calls without earlier cached entries (the prompt) run on the attached backend. Encoder-decoder
models: ``cache_encdec.py``. A graph-safe form of the decode step (slot and positions as device
tensors, compaction into fixed-capacity buffers; for CUDA graphs): ``decode_loop.py``.

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

COMPACT_EVERY = 32  # decode steps between compactions of a layer (free slots kept for them)


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


def live_bound(last: torch.Tensor) -> list[int]:
    """``bound[m]`` for ``m = 0 .. K`` (``last``: long ``[Hkv, K]``, as :func:`last_reads`): the most
    positions ``p < m' <= last[g, p]`` of one head over ``m' <= m``, i.e. an upper bound on the
    entries live for a query at any position up to ``m`` (positions past ``K`` not counted)."""
    last = last.detach().cpu().long()
    Hkv, K = last.shape
    p = torch.arange(K).expand(Hkv, K)
    hi = last.clamp(max=K)
    reads = hi > p  # p is live for the queries at p + 1 .. hi
    diff = torch.zeros(Hkv, K + 2, dtype=torch.long)
    diff.scatter_add_(1, (p + 1) * reads, reads.long())
    diff.scatter_add_(1, (hi + 1).clamp_min(0) * reads, -reads.long())
    diff[:, 0] = 0  # the dummy index of entries that are never live
    counts = diff.cumsum(1)[:, :K + 1]  # [Hkv, K + 1]: live entries for a query at m
    return counts.max(0).values.cummax(0).values.tolist()


class _Step:
    """What the layers of one forward share: its tokens' positions (``new``: ``[B or 1, n]``, -1
    padding), their clamped form for attention (``q_pos``) and, for compactions, the first
    position of each sequence (``first``)."""

    __slots__ = ("key", "new", "new3", "q_pos", "_first", "_blocks")

    def __init__(self, key, new: torch.Tensor):
        self.key, self.new, self._first, self._blocks = key, new, None, {}
        self.new3 = new[:, None, :]  # [B or 1, 1, n]: broadcast over kv heads
        self.q_pos = new.clamp_min(0)

    def q_block(self, b: int) -> torch.Tensor:
        """``q_pos // b`` (cached: the keep table's query rows, shared by sites of one block size)."""
        if b not in self._blocks:
            self._blocks[b] = self.q_pos if b == 1 else self.q_pos // b
        return self._blocks[b]

    @property
    def first(self) -> torch.Tensor:
        if self._first is None:
            self._first = torch.where(self.new >= 0, self.new, torch.iinfo(torch.long).max).min(-1).values
        return self._first


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
        self._bound = live_bound(self._last)
        self.seen = 0  # tokens seen so far (cached + current)
        # keys / values / pos: the buffers, C filled slots and room for later entries (zeros, -1)
        self.pos: torch.Tensor | None = None
        self.C = 0  # filled slots
        self.held_before = 0  # entries held before the current update (0: a prompt call)
        self.new_pos: torch.Tensor | None = None  # [B or 1, n] positions of the current queries
        self.q_pos: torch.Tensor | None = None  # new_pos clamped at 0 (attention's query positions)
        self._st: _Step | None = None  # what the layers of the current forward share
        self._since_compact = 0  # updates since the last compaction
        self._last_n = 0  # tokens of the last update (> 1: a prompt, compact at the next)
        self._slots = ((), (), ())  # one-slot views of the room: key, value, position
        self._base = 0  # the slot of _slots[.][0]
        self._dev_keep: dict = {}  # the keep table on a device, for the attention (apply._Patch)
        self.capacity: int | None = None  # fixed slots of the buffers (decode_loop: compactions fill them in place)

    def lazy_initialization(self, key_states, value_states) -> None:
        B, Hkv, _, D = key_states.shape
        self.device, self.dtype = key_states.device, key_states.dtype
        self._alloc(key_states.new_zeros(B, Hkv, 0, D), value_states.new_zeros(B, Hkv, 0, value_states.shape[-1]),
                    torch.zeros(B, Hkv, 0, dtype=torch.long, device=self.device), 0)
        self._last = self._last.to(self.device)
        self._heads = torch.arange(Hkv, device=self.device)[None, :, None]
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[2]
        st, extend = self.cache._step(self.seen, n, self.device)
        if extend != self._extend or (extend and self.seen + n > self._last.shape[1]):
            self._table(extend, self.seen + n)
        if n == 1 and self.cache._graph is not None:  # the graph-safe decode step (decode_loop.py)
            return self.cache._graph.update(self, key_states, value_states, st)
        C = self.held_before = self.C
        i = C - self._base
        if n == 1 and i < len(self._slots[0]) and self._since_compact < COMPACT_EVERY - 1 and self._last_n == 1:
            # the decode step: the entry goes into the next free slot (three copies, nothing else)
            ks, vs, ps = self._slots
            ks[i].copy_(key_states)
            vs[i].copy_(value_states)
            ps[i].copy_(st.new3)
            self._since_compact += 1
            self.C = C + 1
        elif not C:  # the prompt: its entries held as they come (the next update compacts them)
            self._alloc(key_states, value_states, st.new3.expand(*key_states.shape[:2], n), n)
        else:
            if self._last_n != 1 or self._since_compact >= COMPACT_EVERY - 1 or C + n > self.pos.shape[-1]:
                self._compact(st, n)
            else:
                self._since_compact += 1
            C = self.held_before = self.C
            self.keys[:, :, C:C + n] = key_states
            self.values[:, :, C:C + n] = value_states
            self.pos[:, :, C:C + n] = st.new3
            self.C = C + n
        self.new_pos, self.q_pos, self._st = st.new, st.q_pos, st
        self.seen += n
        self._last_n = n
        return self.keys, self.values

    def _alloc(self, keys, values, pos, capacity: int) -> None:
        """Hold ``keys``/``values``/``pos`` (C slots) in buffers of ``capacity >= C`` slots, the room
        zeros (keys, values: finite where the attention masks them out) and -1 (positions)."""
        C = pos.shape[-1]
        fixed = self.capacity is not None and capacity > C
        if fixed:  # decode_loop: one buffer size for the whole generation, filled in place when it fits
            capacity = self.capacity = max(capacity, self.capacity)
            if self.pos is not None and tuple(self.pos.shape) == (*pos.shape[:2], capacity):
                self.keys[:, :, :C].copy_(keys)
                self.values[:, :, :C].copy_(values)
                self.pos[:, :, :C].copy_(pos)
                self.pos[:, :, C:].fill_(-1)  # the keys and values there stay finite: masked out
                self.C, self._slots, self._base = C, ((), (), ()), C
                return
        if capacity > C:
            kb = keys.new_zeros(*keys.shape[:2], capacity, keys.shape[-1])
            vb = values.new_zeros(*values.shape[:2], capacity, values.shape[-1])
            pb = pos.new_full((*pos.shape[:2], capacity), -1)
            kb[:, :, :C], vb[:, :, :C], pb[:, :, :C] = keys, values, pos
            keys, values, pos = kb, vb, pb
        self.keys, self.values, self.pos, self.C = keys, values, pos, C
        if fixed:  # no one-slot views (the graph-safe step writes by a device index)
            self._slots, self._base = ((), (), ()), C
        else:
            self._slot_views(C)

    def _slot_views(self, base: int) -> None:
        self._base = base
        self._slots = tuple(t[:, :, base:].split(1, dim=2) if t.shape[2] > base else ()
                            for t in (self.keys, self.values, self.pos))

    def _table(self, extend: bool, need: int) -> None:
        """Make the last-read table cover positions ``< need`` (grown by doubling under extend)."""
        length = max(need, 2 * self._last.shape[1]) if extend else None
        last = last_reads(self.site_mask, self.site_mask.info.num_kv_heads, self.window, extend=extend,
                          length=length)
        self._bound = live_bound(last)
        self._last = last.to(self.device)
        self._extend = extend

    def _live(self, first: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """bool [B, Hkv, C]: held entries that a query at position >= ``first [B or 1]`` may read."""
        big = torch.iinfo(torch.long).max
        K = self._last.shape[1]
        last = self._last[self._heads, pos.clamp(0, K - 1)]
        last = torch.where(pos >= K, big, last)  # past the table: LengthError decides
        return (pos >= 0) & (last >= first[:, None, None])

    def bound(self, m: int) -> int:
        """Host int >= the live entries of any (sequence, head) for queries from position ``<= m``."""
        K = len(self._bound) - 1
        return self._bound[min(m, K)] + max(0, m - K)

    def _compact(self, st: _Step, n: int) -> None:
        """Drop the entries no query at or after this forward's first query can read, packing the
        rest in order into ``bound + n + COMPACT_EVERY`` slots (no host sync: the bound is the mask's)."""
        self._since_compact = 0
        C = self.C
        pos = self.pos[:, :, :C]
        live = self._live(st.first, pos)
        # no query of this forward sits later; one slot at least (held_before > 0: the prompt is past)
        keep = max(1, min(C, self.bound(self.seen + n - 1)))
        order = torch.argsort((~live).to(torch.int8), dim=-1, stable=True)[..., :keep]
        pos = torch.where(live.gather(-1, order), pos.gather(-1, order), -1)
        idx = order[..., None]
        keys = self.keys[:, :, :C].gather(2, idx.expand(*idx.shape[:-1], self.keys.shape[-1]))
        values = self.values[:, :, :C].gather(2, idx.expand(*idx.shape[:-1], self.values.shape[-1]))
        self._alloc(keys, values, pos, keep + n + COMPACT_EVERY)

    def q_block(self, b: int) -> torch.Tensor:
        """The current queries' keep-table rows ``q_pos // b`` (computed once per forward)."""
        st = self._st
        if st is not None and st.q_pos is self.q_pos:
            return st.q_block(b)
        return self.q_pos if b == 1 else self.q_pos // b

    def decode_keep(self, device, dtype) -> torch.Tensor:
        """The site's keep table on ``device`` as ``dtype`` (cached; for the attention)."""
        key = (device, dtype)
        t = self._dev_keep.get(key)
        if t is None:
            t = self._dev_keep[key] = self.site_mask.keep.to(device).to(dtype).contiguous()
        return t

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.C + query_length, 0

    def get_seq_length(self, *args) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            idx = indices.to(self.device)
            self.keys, self.values, self.pos = (t.index_select(0, idx) for t in (self.keys, self.values, self.pos))
            self._slot_views(self.C)
            if self.new_pos is not None and self.new_pos.shape[0] > 1:
                self.new_pos = self.new_pos.index_select(0, idx)
                self.q_pos = self.q_pos.index_select(0, idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.keys, self.values, self.pos = (t.repeat_interleave(repeats, 0)
                                                for t in (self.keys, self.values, self.pos))
            self._slot_views(self.C)

    def crop(self, tokens_to_remove: int) -> None:
        raise UnsupportedModelError("PrunedKVCache cannot be cropped (assisted / speculative decoding); "
                                    "use the default cache for it")

    def reset(self) -> None:
        self.cache._steps.clear()
        self.keys = self.values = self.pos = None
        self._slots, self._base = ((), (), ()), 0
        self.is_initialized = False
        self.seen = self._since_compact = self._last_n = self.C = 0

    def nbytes(self) -> tuple[int, int, int]:
        """Bytes of keys and values: (kept for later steps: the entries a query at the next
        position may read, compacted as the next update will; in the filled slots now; a dense
        cache's for the same tokens: all of them, or the last ``window - 1`` on a sliding layer)."""
        if not self.is_initialized:
            return 0, 0, 0
        B, Hkv = self.keys.shape[:2]
        per = self.keys.shape[-1] * self.keys.element_size() + self.values.shape[-1] * self.values.element_size()
        nxt = torch.full((1,), self.seen, dtype=torch.long, device=self.device)
        kept = int(self._live(nxt, self.pos[:, :, :self.C]).sum(-1).max()) if self.C else 0
        dense = self.seen if self.window is None else min(self.seen, self.window - 1)
        return B * Hkv * kept * per, B * Hkv * self.C * per, B * Hkv * dense * per


class PrunedKVCache(Cache):
    """A transformers ``Cache`` keeping, per layer and key/value head, only the positions that a later
    query can still read under the attached mask (see the module docstring).

    Args:
        model: a transformers model with ``mask`` attached (``attnprune.apply``, with
            ``beyond="error"`` or ``"extend"``) while the cache is used.
        mask: the attached ``PruneMask``.

    ``cache.kv_bytes()`` reports the bytes held against a dense cache's. Works with batches, left
    padding, greedy, sampling and beam search. For an encoder-decoder model the call returns a
    ``cache_encdec.PrunedEncoderDecoderCache`` (a transformers ``EncoderDecoderCache``: this class
    for the decoder's self-attention, a static kept subset of the encoder's keys and values for
    cross-attention). Not supported (a clear error): cropping (assisted decoding),
    ``beyond="dense"``, models with a relative position bias (T5).
    """

    def __new__(cls, model: nn.Module, mask, *, _decoder: bool = False):
        if cls is PrunedKVCache and not _decoder and _is_encoder_decoder(model):
            from .cache_encdec import PrunedEncoderDecoderCache

            return PrunedEncoderDecoderCache(model, mask)
        return super().__new__(cls)

    def __init__(self, model: nn.Module, mask, *, _decoder: bool = False):
        # _decoder: the self-attention part of an encoder-decoder cache (cache_encdec.py): the decoder's
        # layers, positions from the decoder's padding mask
        sites = {}
        for name, module in model.named_modules():
            idx = getattr(module, "layer_idx", None)
            if isinstance(idx, int) and name in mask and mask.site(name).info.kind == "causal":
                sites[idx] = (name, module)
        cfg = getattr(model, "config", None)
        n = int(getattr(cfg, "num_hidden_layers", 0) or 0) or len(sites)
        if _decoder:
            n = int(getattr(cfg, "decoder_layers", 0) or getattr(cfg, "num_decoder_layers", 0) or 0) or len(sites)
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
        self._steps: dict = {}  # device -> the _Step of the forward running now
        self._step_extend = False
        self._decoder = _decoder
        self._extra_layers: list = []  # an encoder-decoder cache's cross-attention layers (routed too)
        self._graph = None  # decode_loop._DeviceStep while a graph-safe decode loop runs

    def _step(self, seen: int, n: int, device) -> tuple[_Step, bool]:
        """The positions shared by every layer of this forward, and whether ``beyond="extend"``.
        The first layer of a forward computes them (and checks that the mask is attached): the
        layers of one forward update tokens ``seen .. seen + n - 1``, and no two forwards do
        (``seen`` only grows until ``reset``, which forgets them)."""
        st = self._steps.get(device)
        if st is None or st.key != (seen, n):
            ctx, beyond = self._context()
            g = self._graph
            new = (g.positions if g is not None and n == 1  # a device counter, advanced in place (decode_loop)
                   else ctx.own_positions(seen, n, device, decoder=self._decoder))
            st = self._steps[device] = _Step((seen, n), new)
            self._step_extend = beyond == "extend"
        return st, self._step_extend

    def _context(self):
        patch = _patch(self.model)
        if patch is None or patch.mask is not self.mask:
            raise InvalidArgumentError("PrunedKVCache(model, mask) is used while that mask is not attached "
                                       "to the model: run generate inside `with attnprune.apply(model, mask):`")
        if patch.beyond == "dense":
            raise InvalidArgumentError("PrunedKVCache needs beyond='error' or 'extend' (got 'dense'): past "
                                       "the calibrated length every key may be read again, so none could be dropped")
        patch.pruned_layers = {layer.site: layer for layer in (*self.layers, *self._extra_layers)}
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


def _is_encoder_decoder(model) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


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
