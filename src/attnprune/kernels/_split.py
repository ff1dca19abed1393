"""Balancing the dK/dV backward: long kv-block columns cut into chunks (host side, built once).

In the dK/dV pass one program owns one kv tile: kv head ``hk`` (or all kv heads, for a layout
shared by every head) x key block ``kb``; it walks the dK/dV lists of the ``G`` query heads of its
group one after the other. Call that concatenation the tile's *work list* and its length ``W``
(layout blocks). Real masks keep the sink column (key block 0) in every query block row, so its
tile walks all ``Qb`` query blocks of each of the ``G`` heads while the others walk a few: the
grid's tail is one long program.

With ``m`` the mean ``W`` over non-empty tiles, :func:`build_dkdv_split` cuts every tile with
``W > threshold = max(min_chunk, ceil(factor * m))`` into ``ceil(W / cap)`` near-equal chunks,
``cap = max(min_chunk, ceil(chunk_factor * m))``: only tiles well above the mean are split, and then
into pieces no longer than an average tile. Each chunk is its own program writing unscaled fp32
partial sums to a scratch slot; a reduction sums the slots of a tile in chunk order
(deterministic). Tiles not split stay one program storing straight into dK/dV, as in the unsplit
kernel. All tiles are one launch, longest items first (for every batch element).

Measured on an H200 (torch 2.11, triton 3.6; bench/bwd_balance.py: bf16, 8k tokens, B=4, 9/3 heads,
d=64, 128-blocks, 90% sparse causal, CUDA-graph replays and profiler kernel times, 2026-12-02): the
dK/dV kernel of a sink + band layout took 1.13 ms unsplit vs 0.26 ms for a random layout of the same
density; split with these defaults 0.24 ms (random: 0.24 ms, 3 tiles split), fwd+bwd 0.52 vs
0.55 ms. Chunks of 2x the mean instead of 1x left the sink layout at 0.35 ms; without the
longest-first order, 0.30 ms.

``ATTNPRUNE_DKDV_SPLIT=0`` (read at each ``sparse_attention`` call) turns the split off.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

__all__ = ["DkdvSplit", "build_dkdv_split", "split_enabled", "MIN_CHUNK", "FACTOR", "CHUNK_FACTOR"]

MIN_CHUNK = 8  # neither threshold nor chunk is under this many layout blocks (the scratch round trip must pay)
FACTOR = 2.0  # a tile is split when its work is over FACTOR x the mean work of a non-empty tile
CHUNK_FACTOR = 1.0  # into chunks of at most CHUNK_FACTOR x that mean


def split_enabled() -> bool:
    """False when the environment variable ``ATTNPRUNE_DKDV_SPLIT`` is ``0`` (default on)."""
    return os.environ.get("ATTNPRUNE_DKDV_SPLIT", "1") != "0"


@dataclass
class DkdvSplit:
    """Work items of a split dK/dV pass for one plan and one head grouping.

    ``tile_heads`` (TH) x ``layout.k_blocks`` tiles; TH is 1 when one layout serves all heads (each
    item then runs for every kv head: ``hg = Hkv``), else ``Hkv`` (``hg = 1``).

    * ``items`` int32 ``[n_items, 5]``: ``(th, kb, u0, u1, slot)``: entries ``[u0, u1)`` of tile
      ``(th, kb)``'s work list; ``slot`` ``-1`` (whole tile, stored directly) or its scratch slot.
      Sorted by decreasing ``u1 - u0``.
    * ``reduce`` int32 ``[n_split, 4]``: ``(th, kb, slot0, n)`` per split tile; its chunks are slots
      ``slot0 .. slot0 + n - 1`` in list order.
    * ``n_slots``: scratch slots (= chunks of split tiles); ``threshold``: tiles with more work are
      split; ``cap``: the longest chunk (layout blocks);
      ``work`` int64 ``[TH, Kb]`` (CPU): ``W`` of every tile; ``chunks`` int64 ``[TH, Kb]`` (CPU).
    """

    items: torch.Tensor
    reduce: torch.Tensor
    n_items: int
    n_split: int
    n_slots: int
    cap: int
    threshold: int
    tile_heads: int
    hg: int
    work: torch.Tensor
    chunks: torch.Tensor


def build_dkdv_split(bwd_ptr: torch.Tensor, layout_heads: int, k_blocks: int, q_heads: int, kv_heads: int,
                     *, min_chunk: int | None = None, factor: float | None = None,
                     chunk_factor: float | None = None, force: bool = False,
                     longest_first: bool = True) -> DkdvSplit | None:
    """Chunk table for the dK/dV lists ``bwd_ptr`` (int32 ``[layout_heads * k_blocks + 1]``, CSR over
    ``c = h * k_blocks + kb``), or None when no tile is over the threshold (the unsplit kernel
    then runs as it is). One host copy of ``bwd_ptr``: call it once per plan, not per step.

    ``force`` (benchmarks) returns a table even when nothing is split; ``longest_first=False`` keeps
    the items in tile order instead of decreasing work.
    """
    min_chunk = MIN_CHUNK if min_chunk is None else int(min_chunk)
    factor = FACTOR if factor is None else float(factor)
    chunk_factor = CHUNK_FACTOR if chunk_factor is None else float(chunk_factor)
    dev = bwd_ptr.device
    G = q_heads // kv_heads
    ptr = bwd_ptr.to("cpu", torch.int64)
    lens = (ptr[1:] - ptr[:-1]).reshape(layout_heads, k_blocks)
    if layout_heads == 1:
        th_n, hg = 1, kv_heads
        work = lens * G  # every query head of a group walks the same list
    else:  # one layout head per query head: the G heads of kv head th
        th_n, hg = kv_heads, 1
        work = lens.reshape(kv_heads, G, k_blocks).sum(1)
    nonempty = work[work > 0]
    if nonempty.numel() == 0:
        return None
    mean = nonempty.double().mean().item()
    threshold = max(min_chunk, math.ceil(factor * mean), 1)
    cap = min(threshold, max(min_chunk, math.ceil(chunk_factor * mean), 1))
    chunks = torch.where(work > threshold, -(-work // cap), torch.ones_like(work))
    if not force and not bool((chunks > 1).any()):
        return None
    items, reduce = [], []
    slot = 0
    for th in range(th_n):
        for kb in range(k_blocks):
            w, n = int(work[th, kb]), int(chunks[th, kb])
            if n == 1:
                items.append((th, kb, 0, w, -1))
                continue
            bounds = [j * w // n for j in range(n + 1)]  # sizes floor/ceil(w / n) <= cap
            reduce.append((th, kb, slot, n))
            for j in range(n):
                items.append((th, kb, bounds[j], bounds[j + 1], slot + j))
            slot += n
    if longest_first:
        items.sort(key=lambda it: it[2] - it[3])  # stable: longest first, ties in tile order
    return DkdvSplit(
        items=torch.tensor(items, dtype=torch.int32).to(dev),
        reduce=torch.tensor(reduce, dtype=torch.int32).reshape(-1, 4).to(dev),
        n_items=len(items), n_split=len(reduce), n_slots=slot, cap=cap, threshold=threshold,
        tile_heads=th_n, hg=hg,
        work=work, chunks=chunks,
    )
