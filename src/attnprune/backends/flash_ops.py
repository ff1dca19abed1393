"""``backend="flash"`` under ``torch.compile``: FlashAttention-4 as ``torch.library`` custom ops (issue 9).

FA4's ``flash_attn_func`` is an autograd Function around CuTe-DSL kernels that dynamo cannot trace, so
while dynamo traces, the flash backend calls two opaque ops instead (eager calls are unchanged):

* ``attnprune::flash_fwd(q, k, v, key_padding, handle, layout_q_offset, beyond, causal, offset, scale)
  -> (o, lse)``: FA4's forward (``flash_attn.cute.interface._flash_attn_fwd``) on the layout of
  ``handle`` (a layout source of :mod:`attnprune.kernels.ops`), with the metadata, native causality and
  ``mask_mod`` that :func:`~attnprune.backends.flash.flash_sparse_attention` uses eagerly;
* ``attnprune::flash_bwd(do, q, k, v, o, lse, ...) -> (dq, dk, dv)``: FA4's backward
  (``_flash_attn_bwd``) given ``o`` and ``lse``, registered as the forward's autograd formula.

Token-exact layouts follow ``flash.PARTIAL``, decided when the graph is traced from the site mask
(:func:`_token_exact`: a token-level mask, or blocks that are not multiples of 128): ``"triton"`` (the
default) traces the Triton kernels' own ops (:func:`attnprune.kernels.attention_by_handle`); ``"mask_mod"``
and ``"split"`` trace the FA4 ops above, which read the bitmask through the ``mask_mod`` (the split is
eager-only). A traced block-level mask whose layout turns out to hold token-exact blocks (past the
calibrated length with ``beyond="extend"``) runs them through the ``mask_mod`` too: correct, the
choice of kernel only differs.

q, k, v: ``[B, Hq, Lq, D]``, ``[B, Hkv, Lk, D]``; key_padding bool ``[B, Lk]`` or None; o ``[B, Hq, Lq, Dv]``
(FA4's memory layout, ``[B, Lq, Hq, Dv]`` transposed), lse float32 ``[B, Hq, Lq]`` (natural log, with the
scale; ``-inf`` for a row with no kept key).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..kernels import BlockLayout
from ..kernels.attention import _layout_on, attention_by_handle, key_padding_bool
from ..kernels.ops import _SOURCES, _resolve, register_attention_autograd
from . import flash

__all__ = ["flash_by_handle", "flash_fwd", "flash_bwd"]


@torch.compiler.assume_constant_result
def _token_exact(handle: int) -> bool:
    """Whether the layout source ``handle`` gives token-exact 128 x 128 blocks (run at trace time)."""
    obj = _SOURCES[handle][0]
    if isinstance(obj, BlockLayout):
        return obj.num_partial > 0
    block = getattr(obj, "block", None)
    return block is None or block % flash.FLASH_BLOCK[1] != 0 or block % flash.FLASH_BLOCK[0] != 0


def flash_by_handle(q, k, v, handle: int, *, causal: bool = False, scale: float | None = None,
                    key_padding: torch.Tensor | None = None, q_offset: int = 0, layout_q_offset: int = 0,
                    beyond: str = "error") -> torch.Tensor:
    """The flash backend's traceable form (``block_sparse_backend``'s ``by_handle``): one op node per call.
    ``causal``, ``q_offset``: the causal rule ``j <= i + q_offset``; ``layout_q_offset``, ``beyond``: the
    arguments of the handle's layout source."""
    if flash.PARTIAL == "triton" and _token_exact(handle):
        return attention_by_handle(q, k, v, handle, causal=causal, scale=scale, key_padding=key_padding,
                                   q_offset=q_offset, layout_q_offset=layout_q_offset, beyond=beyond)
    key_padding = key_padding_bool(key_padding, k.shape[2], q.device)
    scale = float(q.shape[3] ** -0.5 if scale is None else scale)
    return flash_fwd(q, k, v, key_padding, handle, layout_q_offset, beyond, bool(causal), int(q_offset), scale)[0]


def _call_args(handle, q, k, key_padding, layout_q_offset, beyond, causal, offset):
    """:func:`~attnprune.backends.flash.fa4_call_args` on the layout of ``handle`` for this call."""
    Lq, Lk = q.shape[2], k.shape[2]
    layout = _layout_on(_resolve(handle, Lq, Lk, q.device, layout_q_offset, beyond), q.device)
    return flash.fa4_call_args(layout, Lq, Lk, causal, offset, key_padding)


def _bst(lists):
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    return BlockSparseTensorsTorch(*lists, block_size=flash.FLASH_BLOCK)


@torch.library.custom_op("attnprune::flash_fwd", mutates_args=())
def flash_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding: Optional[torch.Tensor], handle: int,
              layout_q_offset: int, beyond: str, causal: bool, offset: int,
              scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FA4's forward on the layout of ``handle``: ``(o, lse)`` (see the module docstring)."""
    from flash_attn.cute.interface import _flash_attn_fwd

    native, mask_mod, aux, meta = _call_args(handle, q, k, key_padding, layout_q_offset, beyond, causal, offset)
    res = _flash_attn_fwd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                          causal=native, pack_gqa=flash.PACK_GQA, mask_mod=mask_mod, aux_tensors=aux,
                          block_sparse_tensors=_bst(meta["fwd"]), return_lse=True)
    return res[0].transpose(1, 2), res[1]


@flash_fwd.register_fake
def _(q, k, v, key_padding, handle, layout_q_offset, beyond, causal, offset, scale):
    B, Hq, Lq, _ = q.shape
    return q.new_empty(B, Lq, Hq, v.shape[3]).transpose(1, 2), q.new_empty(B, Hq, Lq, dtype=torch.float32)


@torch.library.custom_op("attnprune::flash_bwd", mutates_args=())
def flash_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
              lse: torch.Tensor, key_padding: Optional[torch.Tensor], handle: int, layout_q_offset: int, beyond: str,
              causal: bool, offset: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FA4's backward of :func:`flash_fwd` given its ``o`` and ``lse``: ``(dq, dk, dv)``."""
    from flash_attn.cute.interface import _flash_attn_bwd

    native, mask_mod, aux, meta = _call_args(handle, q, k, key_padding, layout_q_offset, beyond, causal, offset)
    t = [x.transpose(1, 2) for x in (q, k, v, o, do)]
    res = _flash_attn_bwd(t[0], t[1], t[2], t[3], t[4], lse.contiguous(), softmax_scale=scale, causal=native,
                          pack_gqa=flash.PACK_GQA, mask_mod=mask_mod, aux_tensors=aux,
                          block_sparse_tensors=_bst(meta["bwd"]))
    return tuple(g.transpose(1, 2).contiguous() for g in res[:3])


@flash_bwd.register_fake
def _(do, q, k, v, o, lse, key_padding, handle, layout_q_offset, beyond, causal, offset, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


register_attention_autograd(flash_fwd, flash_bwd, 6)  # handle, layout_q_offset, beyond, causal, offset, scale
