"""BlockLayout: which kv blocks each query block of each head visits, in compact index form.

A layout is built once per mask (``SiteMask.layout`` caches it) and consumed by the Triton kernels
in :mod:`attnprune.kernels.attention` and by the FlexAttention backend. It never materialises an
``Lq x Lk`` tensor when built from block flags.

Storage (all on the layout's device):

* ``row``   int64 ``[nnz]``: ``h * Qb + qb`` of every kept block, sorted by (row, kb).
* ``col``   int32 ``[nnz]``: ``kb`` of every kept block.
* ``code``  int32 ``[nnz]``: ``-1`` for a fully kept block, else an index into ``bits``.
* ``bits``  int32 ``[P, bq, ceil(bk/32)]``: packed token bitmasks of the ``P`` partly kept blocks;
  bit ``j % 32`` of word ``[p, i, j // 32]`` says whether query ``i`` of the block keeps key ``j``.

For a call with given lengths / causality, :meth:`BlockLayout.plan` derives (and caches) the arrays
the kernels read: a CSR list per (head, query block) for the forward pass and ``dq``, and its
transpose, per (head, kv block), for ``dk``/``dv``. In each list the blocks that need no masking at
all come first (the kernels run them without any per-element mask), then the blocks that need one
(partly kept, causal diagonal, or past the end of the keys).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import InvalidArgumentError

__all__ = ["BlockLayout", "LayoutPlan"]


def _pack_bits(blocks: torch.Tensor) -> torch.Tensor:
    """Pack bool ``[P, bq, bk]`` into int32 ``[P, bq, ceil(bk/32)]`` (bit j%32 of word j//32)."""
    p, bq, bk = blocks.shape
    nw = (bk + 31) // 32
    pad = nw * 32 - bk
    if pad:
        blocks = torch.nn.functional.pad(blocks, (0, pad))
    b = blocks.reshape(p, bq, nw, 32)
    words = torch.zeros(p, bq, nw, dtype=torch.int32, device=blocks.device)
    for i in range(32):  # int32 shifts: bit 31 wraps to the sign bit, as intended
        words |= b[..., i].to(torch.int32) << i
    return words


def _unpack_bits(words: torch.Tensor, bk: int) -> torch.Tensor:
    """Inverse of :func:`_pack_bits`: int32 ``[P, bq, nw]`` -> bool ``[P, bq, bk]``."""
    shifts = torch.arange(32, device=words.device, dtype=torch.int64)
    w = words.to(torch.int64) & 0xFFFFFFFF
    bits = (w[..., None] >> shifts) & 1
    return bits.reshape(*words.shape[:-1], words.shape[-1] * 32)[..., :bk].bool()


@dataclass
class LayoutPlan:
    """Kernel-ready index arrays of a layout for one (Lq, Lk, causal, q_offset). All int32.

    Forward / dq lists, per row ``r = h * Qb + qb`` (``h`` a layout head):
      ``fwd_ptr[r] .. fwd_ptr[r+1]`` index ``fwd_col`` (kv block) and ``fwd_code`` (bitmask index or -1);
      the first ``fwd_nclean[r]`` entries need no masking.
    dk/dv lists, per column ``c = h * Kb + kb``: ``bwd_ptr``, ``bwd_row`` (query block), ``bwd_code``,
      ``bwd_nclean``, the same way.
    ``dkdv_splits``: cache of the dK/dV chunk tables (:mod:`attnprune.kernels._split`) per head grouping.
    """

    fwd_ptr: torch.Tensor
    fwd_nclean: torch.Tensor
    fwd_col: torch.Tensor
    fwd_code: torch.Tensor
    bwd_ptr: torch.Tensor
    bwd_nclean: torch.Tensor
    bwd_row: torch.Tensor
    bwd_code: torch.Tensor
    nnz: int
    dkdv_splits: dict = field(default_factory=dict, repr=False)  # see attention._dkdv_split


class BlockLayout:
    """Per-head block-sparse structure of an attention mask.

    Build with :meth:`from_blocks` (block flags, ``[H, ceil(Lq/bq), ceil(Lk/bk)]``) or
    :meth:`from_tokens` (token mask ``[H, Lq, Lk]``; partly kept blocks carry packed bitmasks so
    the kernels stay token-exact). ``H`` is the number of query heads, or 1 to share one layout
    across all heads.

    Attributes: ``num_heads``, ``q_blocks``, ``k_blocks``, ``block`` ``(bq, bk)``, ``q_len``/``k_len``
    (token lengths when built from tokens, else ``q_blocks*bq`` / ``k_blocks*bk``), ``device``,
    ``nnz`` (kept blocks), ``num_partial`` (kept blocks with a bitmask), ``density``.
    """

    def __init__(
        self,
        num_heads: int,
        q_blocks: int,
        k_blocks: int,
        block: tuple[int, int],
        row: torch.Tensor,
        col: torch.Tensor,
        code: torch.Tensor,
        bits: torch.Tensor,
        q_len: int | None = None,
        k_len: int | None = None,
    ):
        self.num_heads = int(num_heads)
        self.q_blocks = int(q_blocks)
        self.k_blocks = int(k_blocks)
        self.block = (int(block[0]), int(block[1]))
        self.row, self.col, self.code, self.bits = row, col, code, bits
        self.q_len = int(q_len) if q_len is not None else self.q_blocks * self.block[0]
        self.k_len = int(k_len) if k_len is not None else self.k_blocks * self.block[1]
        self._plans: dict = {}
        self._cache: dict = {}  # free slot for backends (e.g. a FlexAttention BlockMask)

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _check_block(block) -> tuple[int, int]:
        if isinstance(block, int):
            block = (block, block)
        bq, bk = int(block[0]), int(block[1])
        for b in (bq, bk):
            if b < 16 or b & (b - 1):
                raise InvalidArgumentError(
                    f"block size {b} is not supported by the kernels: use a power of two >= 16"
                )
        return bq, bk

    @classmethod
    def from_blocks(
        cls,
        keep: torch.Tensor,
        block: int | tuple[int, int] = (128, 128),
        *,
        q_len: int | None = None,
        k_len: int | None = None,
    ) -> "BlockLayout":
        """Layout from block flags.

        Args:
            keep: bool ``[H, Qb, Kb]``; ``keep[h, i, j]`` keeps query block ``i`` x key block ``j``
                of head ``h`` entirely (``H`` = query heads, or 1 for all heads).
            block: ``(bq, bk)`` token size of a block (powers of two >= 16).
            q_len, k_len: optional token lengths (default ``Qb*bq``, ``Kb*bk``); informational.
        """
        bq, bk = cls._check_block(block)
        if keep.dim() == 2:
            keep = keep[None]
        if keep.dim() != 3:
            raise InvalidArgumentError(f"keep must be [H, Qb, Kb], got shape {tuple(keep.shape)}")
        keep = keep.bool()
        h, qb, kb = keep.shape
        idx = keep.reshape(h * qb, kb).nonzero()  # sorted row-major: (row, kb)
        row = idx[:, 0].contiguous()
        col = idx[:, 1].to(torch.int32).contiguous()
        code = torch.full_like(col, -1)
        bits = torch.zeros(0, bq, (bk + 31) // 32, dtype=torch.int32, device=keep.device)
        return cls(h, qb, kb, (bq, bk), row, col, code, bits, q_len, k_len)

    @classmethod
    def from_tokens(cls, keep: torch.Tensor, block: int | tuple[int, int] = (128, 128)) -> "BlockLayout":
        """Layout from a token-level mask.

        Args:
            keep: bool ``[H, Lq, Lk]``, True where query ``i`` may attend key ``j``.
            block: ``(bq, bk)``. Blocks with every entry kept run unmasked; partly kept blocks get a
                packed bitmask; empty blocks are skipped.
        """
        bq, bk = cls._check_block(block)
        if keep.dim() == 2:
            keep = keep[None]
        if keep.dim() != 3:
            raise InvalidArgumentError(f"keep must be [H, Lq, Lk], got shape {tuple(keep.shape)}")
        keep = keep.bool()
        h, lq, lk = keep.shape
        qb, kb = -(-lq // bq), -(-lk // bk)
        padded = torch.nn.functional.pad(keep, (0, kb * bk - lk, 0, qb * bq - lq))
        view = padded.view(h * qb, bq, kb, bk)  # no copy
        counts = view.sum(dim=3, dtype=torch.int32).sum(dim=1)  # [h*qb, kb] kept tokens per block
        idx = (counts > 0).nonzero()
        row = idx[:, 0].contiguous()
        col = idx[:, 1].to(torch.int32).contiguous()
        partial = counts[row, col.long()] < bq * bk
        code = torch.full_like(col, -1)
        npart = int(partial.sum())
        code[partial] = torch.arange(npart, dtype=torch.int32, device=keep.device)
        rp, cp = row[partial], col[partial].long()
        chunk = 4096  # blocks packed at a time: bounds the temporary memory
        words = [_pack_bits(view[rp[i:i + chunk], :, cp[i:i + chunk], :]) for i in range(0, npart, chunk)]
        bits = torch.cat(words) if words else torch.zeros(0, bq, (bk + 31) // 32, dtype=torch.int32,
                                                           device=keep.device)
        return cls(h, qb, kb, (bq, bk), row, col, code, bits, lq, lk)

    # ------------------------------------------------------------------ queries
    @property
    def device(self) -> torch.device:
        return self.col.device

    @property
    def nnz(self) -> int:
        return int(self.col.numel())

    @property
    def num_partial(self) -> int:
        return int(self.bits.shape[0])

    @property
    def density(self) -> float:
        """Kept blocks / all blocks."""
        return self.nnz / max(1, self.num_heads * self.q_blocks * self.k_blocks)

    def to(self, device) -> "BlockLayout":
        """A copy on ``device`` (cached plans are not copied)."""
        device = torch.device(device)
        if device == self.device:
            return self
        return BlockLayout(
            self.num_heads, self.q_blocks, self.k_blocks, self.block,
            self.row.to(device), self.col.to(device), self.code.to(device), self.bits.to(device),
            self.q_len, self.k_len,
        )

    def windowed(self, window: int, offset: int = 0) -> "BlockLayout":
        """This layout intersected with the lower edge of a causal sliding window: query ``i`` keeps key
        ``j`` only if ``i + offset - j < window`` (``offset``: the call's causal offset; the upper edge,
        ``j <= i + offset``, is the kernels' causality). Blocks wholly past the edge are dropped, blocks
        across it get a bitmask (their own narrowed, if they had one); nothing of size ``Lq x Lk`` is
        built. Cached per ``(window, offset)``."""
        key = ("window", int(window), int(offset))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        bq, bk = self.block
        first = (self.row % self.q_blocks) * bq + offset - self.col.long() * bk  # i + offset - j at (0, 0)
        keep = first - (bk - 1) < window  # some entry of the block lies inside the window
        row, col, code, first = self.row[keep], self.col[keep], self.code[keep], first[keep]
        edge = first + (bq - 1) >= window  # some entry lies outside: the block needs a bitmask
        inner = (code >= 0) & ~edge  # partial blocks inside the window keep their bitmask
        new_code = torch.full_like(code, -1)
        n_inner = int(inner.sum())
        new_code[inner] = torch.arange(n_inner, dtype=torch.int32, device=code.device)
        new_code[edge] = n_inner + torch.arange(int(edge.sum()), dtype=torch.int32, device=code.device)
        words = [self.bits[code[inner].long()]]
        r = torch.arange(bq, device=code.device)[:, None]
        c = torch.arange(bk, device=code.device)[None, :]
        e_first, e_code = first[edge], code[edge]
        for s in range(0, int(e_first.numel()), 4096):  # bounds the temporary [chunk, bq, bk] tiles
            tiles = (e_first[s:s + 4096, None, None] + r - c) < window
            had = e_code[s:s + 4096]
            part = had >= 0
            tiles[part] &= _unpack_bits(self.bits[had[part].long()], bk)
            words.append(_pack_bits(tiles))
        out = BlockLayout(self.num_heads, self.q_blocks, self.k_blocks, self.block, row.contiguous(),
                          col.contiguous(), new_code, torch.cat(words), self.q_len, self.k_len)
        self._cache[key] = out
        return out

    def block_mask(self) -> torch.Tensor:
        """Dense bool ``[H, Qb, Kb]`` of kept blocks (for tests and FlexAttention)."""
        out = torch.zeros(self.num_heads * self.q_blocks * self.k_blocks, dtype=torch.bool, device=self.device)
        out[self.row * self.k_blocks + self.col.long()] = True
        return out.reshape(self.num_heads, self.q_blocks, self.k_blocks)

    def code_table(self) -> torch.Tensor:
        """int32 ``[H, Qb, Kb]``: bitmask index of each partly kept block, -1 for full, -2 for pruned."""
        out = torch.full((self.num_heads * self.q_blocks * self.k_blocks,), -2, dtype=torch.int32, device=self.device)
        out[self.row * self.k_blocks + self.col.long()] = self.code
        return out.reshape(self.num_heads, self.q_blocks, self.k_blocks)

    def to_dense(self, lq: int | None = None, lk: int | None = None) -> torch.Tensor:
        """Token-level bool ``[H, lq, lk]`` this layout keeps (tests / reference only: O(Lq*Lk))."""
        lq = self.q_len if lq is None else lq
        lk = self.k_len if lk is None else lk
        bq, bk = self.block
        h, qb, kb = self.num_heads, self.q_blocks, self.k_blocks
        dense = torch.zeros(h * qb, kb, bq, bk, dtype=torch.bool, device=self.device)
        full = self.code < 0
        dense[self.row[full], self.col[full].long()] = True
        if self.num_partial:
            part = ~full
            dense[self.row[part], self.col[part].long()] = _unpack_bits(self.bits, bk)[self.code[part].long()]
        dense = dense.reshape(h, qb, kb, bq, bk).transpose(2, 3).reshape(h, qb * bq, kb * bk)
        out = torch.zeros(h, lq, lk, dtype=torch.bool, device=self.device)
        mq, mk = min(lq, qb * bq), min(lk, kb * bk)
        out[:, :mq, :mk] = dense[:, :mq, :mk]
        return out

    def __repr__(self) -> str:
        return (
            f"BlockLayout(heads={self.num_heads}, blocks={self.q_blocks}x{self.k_blocks}, block={self.block}, "
            f"kept={self.nnz} ({self.density:.1%}), partial={self.num_partial}, device={self.device})"
        )

    # ------------------------------------------------------------------ kernel plans
    def plan(self, lq: int, lk: int, causal: bool = False, q_offset: int = 0) -> LayoutPlan:
        """Kernel index arrays for queries ``0..lq`` and keys ``0..lk`` (cached per arguments).

        ``causal``: query ``i`` sees key ``j`` only if ``j <= i + q_offset``. Blocks entirely in the
        causal future or past the end of the keys / queries are dropped here.
        """
        key = (int(lq), int(lk), bool(causal), int(q_offset) if causal else 0)
        p = self._plans.get(key)
        if p is None:
            p = self._build_plan(*key)
            self._plans[key] = p
        return p

    def dkdv_split(self, lq: int, lk: int, causal: bool, q_offset: int, q_heads: int, kv_heads: int):
        """The dK/dV chunk table (:class:`~attnprune.kernels._split.DkdvSplit`) of ``plan(lq, lk,
        causal, q_offset)`` for ``q_heads`` query / ``kv_heads`` kv heads, or None when no kv tile
        is long enough to be split. Cached in the plan (with the chunking constants in the key)."""
        from . import _split

        plan = self.plan(lq, lk, causal, q_offset)
        key = (int(q_heads), int(kv_heads), _split.MIN_CHUNK, _split.FACTOR, _split.CHUNK_FACTOR)
        if key not in plan.dkdv_splits:
            plan.dkdv_splits[key] = _split.build_dkdv_split(plan.bwd_ptr, self.num_heads, self.k_blocks,
                                                            int(q_heads), int(kv_heads))
        return plan.dkdv_splits[key]

    def _build_plan(self, lq: int, lk: int, causal: bool, q_offset: int) -> LayoutPlan:
        bq, bk = self.block
        h_n, qb_n, kb_n = self.num_heads, self.q_blocks, self.k_blocks
        if lq > qb_n * bq or lk > kb_n * bk:
            raise InvalidArgumentError(
                f"layout covers {qb_n * bq} queries x {kb_n * bk} keys but the inputs have {lq} x {lk}; "
                "build the layout for the longer lengths"
            )
        dev = self.device
        # Work on the dense [H, Qb, Kb] table of codes (-2 pruned, -1 full, >=0 bitmask): the block
        # grid, never tokens. nonzero() of it and of its transpose gives both orders without sorting.
        table = self.code_table()
        qb_i = torch.arange(qb_n, device=dev)[:, None]
        kb_i = torch.arange(kb_n, device=dev)[None, :]
        drop = (qb_i * bq >= lq) | (kb_i * bk >= lk)
        if causal:
            last_q = torch.clamp((qb_i + 1) * bq, max=lq) - 1
            drop = drop | (kb_i * bk > last_q + q_offset)
        table = table.masked_fill(drop[None], -2)
        needs_mask = ((kb_i + 1) * bk > lk).expand(qb_n, kb_n)
        if causal:
            needs_mask = needs_mask | ((kb_i + 1) * bk - 1 > qb_i * bq + q_offset)

        def lists(tab: torch.Tensor, nmask: torch.Tensor):
            """tab [H, A, C] -> CSR over (h, a) of c, clean entries first, each part in c order."""
            h_, a_, c_ = tab.shape
            idx = (tab >= -1).nonzero()  # sorted by (h, a, c)
            hh, aa, cc = idx[:, 0], idx[:, 1], idx[:, 2]
            code = tab[hh, aa, cc]
            masked = (code >= 0) | nmask[aa, cc]
            group = hh * a_ + aa
            ng = h_ * a_
            counts = torch.bincount(group, minlength=ng)
            ptr = torch.zeros(ng + 1, dtype=torch.int64, device=dev)
            ptr[1:] = torch.cumsum(counts, 0)
            clean = ~masked
            nclean = torch.bincount(group[clean], minlength=ng)
            nmasked = counts - nclean
            cstart = torch.cumsum(nclean, 0) - nclean  # clean entries before each group
            mstart = torch.cumsum(nmasked, 0) - nmasked
            crank = torch.cumsum(clean.long(), 0) - 1 - cstart[group]
            mrank = torch.cumsum(masked.long(), 0) - 1 - mstart[group]
            pos = ptr[group] + torch.where(clean, crank, nclean[group] + mrank)
            out_c = torch.empty_like(cc, dtype=torch.int32)
            out_code = torch.empty_like(code)
            out_c[pos] = cc.to(torch.int32)
            out_code[pos] = code
            return ptr.to(torch.int32), nclean.to(torch.int32), out_c, out_code

        fptr, fclean, fcol, fcode = lists(table, needs_mask)
        bptr, bclean, brow, bcode = lists(table.transpose(1, 2), needs_mask.t())
        return LayoutPlan(
            fwd_ptr=fptr, fwd_nclean=fclean, fwd_col=fcol, fwd_code=fcode.contiguous(),
            bwd_ptr=bptr, bwd_nclean=bclean, bwd_row=brow, bwd_code=bcode.contiguous(),
            nnz=int(fcol.numel()),
        )
