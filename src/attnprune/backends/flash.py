"""``backend="flash"``: a site's mask run through FlashAttention-4's block-sparse attention (CuTe DSL).

Needs ``flash-attn-4`` (``pip install 'attnprune[hopper]'``) and an sm90+ GPU. The site's
:class:`~attnprune.kernels.BlockLayout` (128 x 128 blocks) becomes FA4's FlexAttention-style metadata
(:func:`fa4_metadata`, pure torch, cached on the layout): per query block the kv blocks to run unmasked
("full") and those that need a ``mask_mod`` ("mask": partly kept, causal diagonal, past the end of the
keys, or touched by key padding), each list in ascending block order, plus the transposed lists (per kv
block) for the backward. The ``mask_mod`` reads the layout's packed bitmask, the causal offset and the
key padding from ``aux_tensors``, so partial blocks stay token-exact and new offsets/lengths do not
recompile (FA4 compiles once per configuration).

Causal calls on block-exact layouts (no token-exact partial blocks, no key padding) whose causal
offset is FA4's own (``q_offset == Lk - Lq``: prefill, and decoding over a full cache) use FA4's
native causal masking (when enabled, below) instead of the ``mask_mod`` (FA4 ignores ``causal`` when a ``mask_mod`` is
given, and a per-element ``mask_mod`` on every diagonal block costs 15-50% of the call on an H200,
measured): the diagonal blocks go in the "mask" lists, which FA4 masks causally, as it does any block.
On by default since 2026-12-05 (``NATIVE_CAUSAL = False`` or ``ATTNPRUNE_FA4_NATIVE_CAUSAL=0`` keeps the
``mask_mod``): on an H200 (bench/fa4_check.py, 2026-12-02, BENCHMARKS.md) it gave bit-identical outputs and
gradients to the ``mask_mod`` path, it is the call FA4 direct makes, and over the 24 causal rows it took 0.95x
the ``mask_mod`` time (geometric mean; 0.72x-1.10x, slower on 8 rows, most of them d 64 at 16k).

Layouts with token-exact (bitmask) blocks have three ways, chosen by ``PARTIAL`` (environment variable
``ATTNPRUNE_FA4_PARTIAL``, read at import; any other value is an error at the call):

* ``"triton"`` (default since 2026-12-05): the whole call goes to the project's Triton kernels
  (:func:`attnprune.kernels.sparse_attention`), which read the bitmask one word per (row, 32 columns).
  On an H200 (bench/fa4_check.py ``--variants split``, 2026-12-05, BENCHMARKS.md) with 20% of the kept
  blocks token-exact it took 1.47x FA4's block-exact time in geometric mean over 32 rows (d 64 / 128,
  4k / 16k, causal and not, densities 0.5 / 0.1, fwd and fwd+bwd), against 1.68x for ``"mask_mod"`` and
  1.67x for ``"split"`` (range 0.88-1.80x); the fastest of the three on 16 rows, and 1.12x its own block-exact
  time (geometric mean).
* ``"mask_mod"``: one FA4 call, the bitmask read by the ``mask_mod`` above. On sm90 it runs per element:
  1.36-2.12x the block-exact time on that run (the fastest way on 6 rows, d 128 fwd+bwd).
* ``"split"``: FA4 runs the full blocks only, block-exact with no ``mask_mod`` (but for key padding on the
  blocks it touches), the project's Triton kernel runs the partial / causal-diagonal / end-of-keys blocks,
  and the two merge exactly through the log-sum-exp, forward and backward
  (:mod:`attnprune.backends._flash_split`): 1.28-2.50x (the fastest on 10 rows, most at density 0.5 and
  16k; at density 0.1 two kernel launches and the merge cost more than they save).
The split's layouts are built on a call's first use (one host read), so a CUDA graph capture needs an
eager call of the same shapes first.

Under ``torch.compile`` the backend traces as custom ops (:mod:`attnprune.backends.flash_ops`).
"""

from __future__ import annotations

import functools
import os

import torch

from ..errors import InvalidArgumentError, MissingDependencyError
from ..kernels import BlockLayout
from ..kernels.attention import _layout_on, _placeholder, key_padding_bool
from . import BACKENDS
from ._block_sparse import block_sparse_backend

__all__ = ["flash_backend", "flash_sparse_attention", "fa4_block_tables", "fa4_metadata", "FLASH_BLOCK"]

FLASH_BLOCK = (128, 128)
PACK_GQA = False  # FA4's packed-GQA path with block sparsity is not verified here
# see the module docstring (checked against float64 and the mask_mod path on an H200, bench/fa4_check.py)
NATIVE_CAUSAL = os.environ.get("ATTNPRUNE_FA4_NATIVE_CAUSAL", "1") != "0"
# see the module docstring: "triton" (default), "mask_mod" or "split", for layouts with token-exact blocks
PARTIAL = os.environ.get("ATTNPRUNE_FA4_PARTIAL", "triton")


def _by_split(q, k, v, layout, **kw):
    from ._flash_split import split_attention

    return split_attention(q, k, v, layout, full="fa4", **kw)


def _by_triton(q, k, v, layout, **kw):
    from ..kernels import sparse_attention

    return sparse_attention(q, k, v, layout, **kw)


# PARTIAL -> how a layout with token-exact blocks runs (None: FA4's mask_mod, below in flash_sparse_attention)
PARTIAL_WAYS = {"mask_mod": None, "split": _by_split, "triton": _by_triton}


def fa4_block_tables(layout: BlockLayout, lq: int, lk: int, causal: bool = False, q_offset: int = 0):
    """(full, part) bool ``[H, ceil(lq/bq), ceil(lk/bk)]``: blocks run without / with the mask_mod.

    Blocks in the causal future (``j <= i + q_offset``) or past the ends are dropped; partly kept
    blocks, causal-diagonal blocks and the block holding the end of the keys are ``part``.
    Cached on the layout.
    """
    key = ("fa4_tables", int(lq), int(lk), bool(causal), int(q_offset) if causal else 0)
    if key in layout._cache:
        return layout._cache[key]
    bq, bk = layout.block
    qn, kn = -(-lq // bq), -(-lk // bk)
    if qn > layout.q_blocks or kn > layout.k_blocks:
        raise InvalidArgumentError(f"layout covers {layout.q_blocks * bq} x {layout.k_blocks * bk} tokens, "
                                   f"the inputs {lq} x {lk}")
    codes = layout.code_table()[:, :qn, :kn]
    dev = codes.device
    qb = torch.arange(qn, device=dev)[:, None]
    kb = torch.arange(kn, device=dev)[None, :]
    kept = codes >= -1
    needs = ((kb + 1) * bk > lk).expand(qn, kn)
    if causal:
        last_q = torch.clamp((qb + 1) * bq, max=lq) - 1
        kept = kept & (kb * bk <= last_q + q_offset)[None]
        needs = needs | ((kb + 1) * bk - 1 > qb * bq + q_offset)
    part = kept & ((codes >= 0) | needs[None])
    full = kept & ~part
    layout._cache[key] = (full, part)
    return full, part


def _lists(table: torch.Tensor):
    """bool [B, H, A, C] -> (cnt int32 [B, H, A], idx int32 [B, H, A, C]): kept columns first, ascending."""
    cnt = table.sum(-1, dtype=torch.int32)
    idx = torch.argsort((~table).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return cnt.contiguous(), idx.contiguous()


def fa4_metadata(layout: BlockLayout, lq: int, lk: int, *, causal: bool = False, q_offset: int = 0,
                 key_padding: torch.Tensor | None = None) -> dict:
    """FA4 block-sparse lists for this call: ``fwd`` and ``bwd`` tuples
    ``(mask_cnt, mask_idx, full_cnt, full_idx)``, shapes ``[B|1, H, Qn(, Kn)]`` and ``[B|1, H, Kn(, Qn)]``.

    key_padding: bool ``[B, lk]`` (True = real key) or None. With it, blocks holding a padded key move
    to the mask lists and blocks without any real key are dropped (per batch element; not cached, no
    host sync). Without it the result is cached on the layout.
    """
    ck = ("fa4_meta", int(lq), int(lk), bool(causal), int(q_offset) if causal else 0)
    if key_padding is None and ck in layout._cache:
        return layout._cache[ck]
    full, part = fa4_block_tables(layout, lq, lk, causal, q_offset)
    full, part = full[None], part[None]
    if key_padding is not None:
        bk = layout.block[1]
        kn = full.shape[-1]
        kp = key_padding.to(full.device).bool()
        pad = kn * bk - lk
        all_ = torch.nn.functional.pad(kp, (0, pad), value=True).view(-1, kn, bk).all(-1)[:, None, None, :]
        any_ = torch.nn.functional.pad(kp, (0, pad), value=False).view(-1, kn, bk).any(-1)[:, None, None, :]
        part = (part | (full & ~all_)) & any_
        full = full & all_
    meta = {"fwd": _lists(part) + _lists(full),
            "bwd": _lists(part.transpose(-1, -2)) + _lists(full.transpose(-1, -2))}
    if key_padding is None:
        layout._cache[ck] = meta
    return meta


@functools.lru_cache(maxsize=None)
def _mask_mod(has_bits: bool, causal: bool, has_kp: bool, shared: bool, bq: int, bk: int):
    """A CuTe mask_mod; aux_tensors = [params int32 [2] (causal offset, lk), codes [H, Qn, Kn],
    bits [P, bq, bk/32], key padding int32 [B, lk]]."""
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute.utils import scalar_to_ssa

    @cute.jit
    def mask_mod(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
        i = q_idx[0]
        j = kv_idx[0]
        params = aux_tensors[0]
        ok = j < params[1]
        if cutlass.const_expr(causal):
            ok = ok & (j <= i + params[0])
        if cutlass.const_expr(has_bits):
            codes = aux_tensors[1]
            bits = aux_tensors[2]
            if cutlass.const_expr(shared):
                code = codes[0, i // bq, j // bk]
            else:
                code = codes[head[0], i // bq, j // bk]
            word = bits[cutlass.max(code, cutlass.Int32(0)), i % bq, (j % bk) // 32]
            bit = ((word >> (j % 32)) & 1) == 1
            ok = ok & ((code == -1) | ((code >= 0) & bit))
        if cutlass.const_expr(has_kp):
            kp = aux_tensors[3]
            ok = ok & (kp[batch[0], j] != 0)
        return scalar_to_ssa(ok, cutlass.Boolean)

    return mask_mod


def _aux(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    t.__leading_dim__ = t.dim() - 1
    return t



_PARAMS: dict = {}


def _params(q_offset: int, lk: int, device) -> torch.Tensor:
    """int32 ``[2]`` = (causal offset, key length) on ``device``, made once per value: building it per
    call copies from the host, which synchronises (one sync per attention call, measured)."""
    key = (q_offset, lk, str(device))
    t = _PARAMS.get(key)
    if t is None:
        if len(_PARAMS) > 256:
            _PARAMS.clear()
        t = _PARAMS[key] = torch.tensor([q_offset, lk], dtype=torch.int32, device=device)
    return t


def _mask_args(layout: BlockLayout, Lq: int, Lk: int, causal: bool, q_offset: int, key_padding, has_bits: bool):
    """``(mask_mod, aux_tensors)`` for an FA4 call on ``layout`` (on the inputs' device): the bitmask
    when ``has_bits``, causality when ``causal``, key padding (bool ``[B, Lk]``) when given; the
    tensors a variant does not read are 1-element placeholders."""
    dev = layout.device
    bq, bk = layout.block
    qn, kn = -(-Lq // bq), -(-Lk // bk)
    # the tensors a variant does not read: cached placeholders (no allocation or fill kernel per call)
    codes = layout.code_table()[:, :qn, :kn] if has_bits else _placeholder(dev, torch.int32, -1, (1, 1, 1))
    bits = layout.bits if has_bits else _placeholder(dev, torch.int32, -1, (1, bq, (bk + 31) // 32))
    kp = key_padding.to(torch.int32) if key_padding is not None else _placeholder(dev, torch.int32, 1, (1, 1))
    params = _params(int(q_offset), int(Lk), dev)
    aux = [_aux(params), _aux(codes), _aux(bits), _aux(kp)]
    return _mask_mod(has_bits, bool(causal), key_padding is not None, layout.num_heads == 1, bq, bk), aux


def fa4_call_args(layout: BlockLayout, Lq: int, Lk: int, causal: bool, q_offset: int, key_padding):
    """What an FA4 call on ``layout`` (on the inputs' device) takes besides q, k, v, both directions:
    ``(native_causal, mask_mod, aux_tensors, metadata)``. FA4's own causality where it is ours (block-exact,
    no key padding, ``q_offset == Lk - Lq``, ``NATIVE_CAUSAL``), else a ``mask_mod`` for the bitmask,
    causality and key padding (bool ``[B, Lk]``) as needed (None when nothing needs one)."""
    has_bits = layout.num_partial > 0
    meta = fa4_metadata(layout, Lq, Lk, causal=causal, q_offset=q_offset, key_padding=key_padding)
    native = causal and NATIVE_CAUSAL and not has_bits and key_padding is None and int(q_offset) == Lk - Lq
    use_mod = has_bits or (causal and not native) or key_padding is not None
    mask_mod, aux = _mask_args(layout, Lq, Lk, causal, q_offset, key_padding, has_bits) if use_mod else (None, None)
    return native, mask_mod, aux, meta


def flash_sparse_attention(q, k, v, layout: BlockLayout, *, causal=False, scale=None, key_padding=None, q_offset=0):
    """Same contract as :func:`attnprune.kernels.sparse_attention`, computed by FA4's block-sparse kernels.

    q: ``[B, Hq, Lq, D]``, k/v: ``[B, Hkv, Lk, D]`` (CUDA, fp16/bf16) -> ``[B, Hq, Lq, Dv]``.
    """
    try:
        from flash_attn.cute import flash_attn_func
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
    except ImportError as e:
        raise MissingDependencyError(f"backend='flash' needs FlashAttention-4 ({e}): pip install 'attnprune[hopper]' "
                                     "(an sm90+ GPU)") from None
    if tuple(layout.block) != FLASH_BLOCK:
        raise InvalidArgumentError(f"the flash backend needs 128 x 128 layout blocks, got {layout.block}")
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    dev = q.device
    key_padding = key_padding_bool(key_padding, Lk, dev)
    layout = _layout_on(layout, dev)  # moved once per device, with its caches
    has_bits = layout.num_partial > 0
    if has_bits:
        if PARTIAL not in PARTIAL_WAYS:
            raise InvalidArgumentError(f"ATTNPRUNE_FA4_PARTIAL / flash.PARTIAL must be one of {tuple(PARTIAL_WAYS)}, "
                                       f"got {PARTIAL!r}")
        way = PARTIAL_WAYS[PARTIAL]
        if way is not None:
            return way(q, k, v, layout, causal=causal, scale=scale, key_padding=key_padding, q_offset=q_offset)
    native_causal, mask_mod, aux, meta = fa4_call_args(layout, Lq, Lk, causal, q_offset, key_padding)
    fwd = BlockSparseTensorsTorch(*meta["fwd"], block_size=FLASH_BLOCK)
    bwd = BlockSparseTensorsTorch(*meta["bwd"], block_size=FLASH_BLOCK)
    res = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                          causal=native_causal, pack_gqa=PACK_GQA, mask_mod=mask_mod, aux_tensors=aux,
                          block_sparse_tensors=fwd, block_sparse_tensors_bwd=bwd)
    out = res[0] if isinstance(res, tuple) else res
    return out.transpose(1, 2)


def _flash_unsupported(q, k, v) -> str | None:
    if q.device.type != "cuda":
        return "FlashAttention-4 needs a CUDA GPU"
    if torch.cuda.get_device_capability(q.device) < (9, 0):
        return "FlashAttention-4 needs an sm90+ GPU"
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"FlashAttention-4 runs float16/bfloat16 only, got {q.dtype}"
    d, dv = q.shape[-1], v.shape[-1]
    if d % 8 or dv % 8 or not (8 <= d <= 256 and 8 <= dv <= 256):
        return f"FlashAttention-4 does not support head dims ({d}, {dv})"
    return None


# (the lambdas look the names up per call: flash_by_handle is imported below, and the tests replace
# _flash_unsupported to run the backend on an emulated FA4)
flash_backend = block_sparse_backend(flash_sparse_attention, lambda site_mask, lq, lk: FLASH_BLOCK, "flash",
                                     "FlashAttention-4 here", lambda q, k, v: _flash_unsupported(q, k, v),
                                     by_handle=lambda *a, **kw: flash_by_handle(*a, **kw), variants_to="triton")
flash_backend.__doc__ = """Masked attention for one site with FA4 block-sparse attention on the site's layout (128 x 128).

q: ``[B, Hq, Lq, D]``, k/v: ``[B, Hkv, Lk, D]`` -> ``[B, Hq, Lq, D]``.
"""

BACKENDS.add("flash", flash_backend)

from .flash_ops import flash_by_handle  # noqa: E402 - the traceable form (torch.compile) imports this module
