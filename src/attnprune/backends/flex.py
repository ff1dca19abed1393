"""``backend="flex"``: a site's mask run through PyTorch's FlexAttention.

The FlexAttention ``BlockMask`` is built from the same :class:`~attnprune.kernels.BlockLayout` the
Triton backend uses: fully kept blocks become Flex's "full" blocks (no ``mask_mod`` call), partly
kept blocks, causal-diagonal blocks and blocks past the end of the keys become "partial" blocks
whose ``mask_mod`` reads the layout's packed bitmask. ``flex_attention`` is compiled once
(``torch.compile(dynamic=False)``, so once per input shape); block masks are cached on the layout.
"""

from __future__ import annotations

import torch

from ..errors import MissingDependencyError
from ..kernels import BlockLayout
from ..kernels.attention import key_padding_bool
from . import BACKENDS
from ._block_sparse import block_sparse_backend

__all__ = ["flex_backend", "flex_block_mask", "flex_sparse_attention", "FLEX_BLOCK"]

FLEX_BLOCK = (128, 128)
_compiled = None


def _flex(device: torch.device):
    """Compiled flex_attention for CUDA; on other devices the eager one (slow, for tests)."""
    global _compiled
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as e:  # pragma: no cover
        raise MissingDependencyError("backend='flex' needs torch>=2.5 (torch.nn.attention.flex_attention)") from e
    if device.type != "cuda":
        return flex_attention
    if _compiled is None:
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def _ordered(table: torch.Tensor):
    """bool [H, Qb, Kb] -> (num int32 [1, H, Qb], indices int32 [1, H, Qb, Kb]) kept columns first."""
    num = table.sum(-1, dtype=torch.int32)
    idx = torch.argsort((~table).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num[None].contiguous(), idx[None].contiguous()


def flex_block_mask(layout: BlockLayout, lq: int, lk: int, *, causal: bool = False, q_offset: int = 0,
                    key_padding: torch.Tensor | None = None):
    """FlexAttention ``BlockMask`` equal to ``layout`` (+ causality ``j <= i + q_offset``, + key padding).

    key_padding: bool ``[B, lk]`` (True = real key) or None. Without key padding the result is
    cached on the layout per ``(lq, lk, causal, q_offset)``.
    """
    from torch.nn.attention.flex_attention import BlockMask

    key = ("flex", lq, lk, bool(causal), int(q_offset) if causal else 0)
    if key_padding is None and key in layout._cache:
        return layout._cache[key]
    plan = layout.plan(lq, lk, causal, q_offset)
    dev = layout.device
    H, Qb, Kb = layout.num_heads, layout.q_blocks, layout.k_blocks
    bq, bk = layout.block
    counts = (plan.fwd_ptr[1:] - plan.fwd_ptr[:-1]).long()
    ent_row = torch.repeat_interleave(torch.arange(H * Qb, device=dev), counts)
    pos = torch.arange(plan.nnz, device=dev) - plan.fwd_ptr[:-1].long()[ent_row]
    clean = pos < plan.fwd_nclean.long()[ent_row]
    if key_padding is not None:
        clean = torch.zeros_like(clean)
    flat = ent_row * Kb + plan.fwd_col.long()
    full = torch.zeros(H * Qb * Kb, dtype=torch.bool, device=dev)
    part = torch.zeros_like(full)
    full[flat[clean]] = True
    part[flat[~clean]] = True
    full, part = full.reshape(H, Qb, Kb), part.reshape(H, Qb, Kb)
    codes = layout.code_table()  # [H, Qb, Kb]
    bits = layout.bits if layout.num_partial else torch.full((1, bq, (bk + 31) // 32), -1, dtype=torch.int32,
                                                            device=dev)
    shared = H == 1
    kp = key_padding
    has_bits = layout.num_partial > 0

    def mask_mod(b, h, q_idx, kv_idx):
        ok = kv_idx < lk
        if has_bits:  # partly kept blocks: read the packed bitmask (full blocks never call mask_mod)
            hh = h * 0 if shared else h
            code = codes[hh, q_idx // bq, kv_idx // bk]
            word = bits[torch.clamp(code, min=0), q_idx % bq, (kv_idx % bk) // 32]
            bit = (word >> (kv_idx % 32)) & 1
            ok = ok & ((code == -1) | ((code >= 0) & (bit == 1)))
        if causal:
            ok = ok & (kv_idx <= q_idx + q_offset)
        if kp is not None:
            ok = ok & kp[b, kv_idx]
        return ok

    pn, pi = _ordered(part)
    fn, fi = _ordered(full)
    bm = BlockMask.from_kv_blocks(pn, pi, fn, fi, BLOCK_SIZE=(bq, bk), mask_mod=mask_mod, seq_lengths=(lq, lk))
    if key_padding is None:
        layout._cache[key] = bm
    return bm


# Per head dim: kernel options that compiled. Some Flex default tile configurations ask for more
# shared memory than the card has with certain torch/triton versions; then smaller tiles are used.
_OPTIONS: dict[int, dict | None] = {}
SMALL_OPTIONS = {"BLOCK_M": 64, "BLOCK_N": 64, "num_stages": 2}


def flex_sparse_attention(q, k, v, layout: BlockLayout, *, causal=False, scale=None, key_padding=None,
                          q_offset=0, kernel_options=None):
    """Same contract as :func:`attnprune.kernels.sparse_attention`, computed by FlexAttention.

    q: ``[B, Hq, Lq, D]``, k/v: ``[B, Hkv, Lk, D]`` -> ``[B, Hq, Lq, D]``. Rows with no kept key are 0.
    ``kernel_options``: passed to ``flex_attention``; by default Flex's own choice, or smaller
    tiles if that fails to compile for this head dim.
    """
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    key_padding = key_padding_bool(key_padding, Lk, q.device)
    bm = flex_block_mask(layout, Lq, Lk, causal=causal, q_offset=q_offset, key_padding=key_padding)
    fx = _flex(q.device)
    gqa = q.shape[1] != k.shape[1]
    d = q.shape[-1]
    if kernel_options is not None or q.device.type != "cuda":
        return fx(q, k, v, block_mask=bm, scale=scale, enable_gqa=gqa, kernel_options=kernel_options)
    if d not in _OPTIONS:
        try:
            out = fx(q, k, v, block_mask=bm, scale=scale, enable_gqa=gqa)
            _OPTIONS[d] = None
            return out
        except Exception as e:  # noqa: BLE001 - inductor wraps the resource error
            if "resource" not in str(e).lower():
                raise
            _OPTIONS[d] = dict(SMALL_OPTIONS)
    return fx(q, k, v, block_mask=bm, scale=scale, enable_gqa=gqa, kernel_options=_OPTIONS[d])


def _flex_unsupported(q, k, v) -> str | None:
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return "FlexAttention has no backward pass on the CPU (use a GPU, or backend='reference' to train on the CPU)"
    return None


flex_backend = block_sparse_backend(flex_sparse_attention, lambda site_mask, lq, lk: FLEX_BLOCK, "flex",
                                    "FlexAttention here", _flex_unsupported)
flex_backend.__doc__ = """Masked attention for one site with FlexAttention on the site's layout (128 x 128 blocks).

q: ``[B, Hq, Lq, D]``, k/v: ``[B, Hkv, Lk, D]`` -> ``[B, Hq, Lq, D]``.
"""


BACKENDS.add("flex", flex_backend)
