"""Block-sparse attention kernels (Triton): :class:`BlockLayout` and :func:`sparse_attention`.

``BlockLayout`` is plain PyTorch; the Triton kernels are imported when ``sparse_attention`` first
runs, so importing this package works without Triton installed.
"""

from .attention import sparse_attention
from .config import CONFIGS, KernelConfig, get_config
from .layout import BlockLayout, LayoutPlan

__all__ = ["BlockLayout", "LayoutPlan", "sparse_attention", "KernelConfig", "CONFIGS", "get_config"]
