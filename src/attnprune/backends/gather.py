"""``backend="gather"``: a site's mask run block-sparse in plain PyTorch ops, on any device.

What the ``triton`` backend computes, on the same layout (``SiteMask.layout``, the mask's own block when it is a
power of two in 16..128, else 64 x 64), through :func:`attnprune.kernels.gather.gather_attention`: the kept key
blocks of each query block are gathered and only they enter the matmuls, so attention's work falls with the
mask's sparsity on the CPU, Apple's MPS or a CUDA GPU without Triton. Exact (token bitmasks, causality, key
padding, sinks, logit capping per element); calls it cannot express go to the reference backend, with a warning,
as for ``triton``. Not traceable by ``torch.compile`` without graph breaks (the mask's form is read on the host).
"""

from __future__ import annotations

from ..kernels.gather import gather_attention
from . import BACKENDS
from ._block_sparse import block_sparse_backend
from .triton import kernel_block

__all__ = ["gather_backend"]

gather_backend = block_sparse_backend(gather_attention, kernel_block, "gather", "the gather path",
                                      takes=("sinks", "softcap"))
gather_backend.__doc__ = """Masked attention for one site, block-sparse in PyTorch ops (any device).

q: ``[B, Hq, Lq, D]``, k: ``[B, Hkv, Lk, D]``, v: ``[B, Hkv, Lk, Dv]``; ``site_mask``: the site's ``SiteMask``.
Returns ``[B, Hq, Lq, Dv]``; a row with no kept key is 0.
"""

BACKENDS.add("gather", gather_backend)
