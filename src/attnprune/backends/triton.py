"""``backend="triton"``: a site's mask run through the project's block-sparse Triton kernels.

The site's ``SiteMask.layout`` (cached there) gives the kernel layout; causality, key padding and
the calibrated-region rule (``beyond``) are applied exactly as the reference backend does. Calls
the kernels cannot express (dropout, an additive bias that is not just 0/-inf, a boolean mask that
is not key padding with or without causality) are handed to the reference backend, with a warning
naming the site, once per site. The backend comes from the factory shared with ``flex``
(:mod:`._block_sparse`), whose names are re-exported here. Under ``torch.compile`` the kernels run as
custom ops (:mod:`attnprune.kernels.ops`): a masked model traces as one graph.
"""

from __future__ import annotations

from ..kernels import sparse_attention
from ..kernels.attention import attention_by_handle
from . import BACKENDS
from ._block_sparse import _fallback, _warned, block_sparse_backend, split_attn_mask  # noqa: F401 - re-exported

__all__ = ["triton_backend", "block_sparse_backend", "split_attn_mask", "kernel_block"]


def kernel_block(site_mask, lq: int, lk: int) -> tuple[int, int]:
    """Layout block for a site: the mask's own block when it is a power of two in 16..128
    (block masks are handed over without tiling), else 64 x 64."""
    b = getattr(site_mask, "block", None)
    if b and 16 <= b <= 128 and not b & (b - 1):
        return (b, b)
    return (64, 64)


triton_backend = block_sparse_backend(sparse_attention, kernel_block, "triton", "the kernels",
                                      by_handle=attention_by_handle, takes=("sinks", "softcap"),
                                      handle_takes=("sinks", "softcap"))
triton_backend.__doc__ = """Masked attention for one site with the block-sparse kernels.

q: ``[B, Hq, Lq, D]``, k: ``[B, Hkv, Lk, D]``, v: ``[B, Hkv, Lk, Dv]`` on a CUDA device;
``site_mask``: the site's ``SiteMask``. Returns ``[B, Hq, Lq, Dv]``. A row with no kept key is 0.
"""


BACKENDS.add("triton", triton_backend)
