"""attnprune: data-informed static attention sparsity (Attention Pruning) for PyTorch models.

The public API:

- ``observe(model, batches, *, granularity=1, progress=True) -> AttentionStats``
- ``make_mask(stats, sparsity, *, policy="layer", block=None, seed=0) -> PruneMask``
- ``apply(model, mask, *, backend="reference", beyond="error")`` (context manager),
  ``attach(model, mask, ...)`` / ``detach(model)`` (permanent)
- ``finetune(model, examples, *, mask, task, out_dir, config)`` with ``TrainConfig``: training with a mask
  attached, checkpointed and resumable
- ``PrunedKVCache(model, mask)``: a transformers generation cache holding only what the mask still reads
- ``decode_greedy(model, input_ids, cache, max_new_tokens, *, cuda_graph=True)``: greedy decoding with each
  step replayed as a CUDA graph (``PrunedKVCache`` with the mask attached, or a dense model's ``StaticCache``)
- ``AttentionStats``, ``PruneMask``, ``SiteInfo`` and the ``AttnPruneError`` family.

Kernels live in ``attnprune.kernels`` (``sparse_attention``, ``BlockLayout``).
"""

from .apply import OutsideCalibrationWarning, apply, attach, attached_backend, detach, outside_counts
from .decode_loop import GraphCaptureError, decode_greedy
from .errors import (
    AttnPruneError,
    CorruptFileError,
    EmptyDatasetError,
    InvalidArgumentError,
    LengthError,
    MaskMismatchError,
    MissingDependencyError,
    NoAttentionSitesError,
    NonFiniteAttentionError,
    UnsupportedModelError,
)
from .mask import PruneMask
from .observe import observe
from .policies import make_mask
from .sites import SiteInfo
from .stats import AttentionStats
from .train import TrainConfig, finetune
from .environment import remember_commit as _remember_commit

__version__ = "0.1.0"
_remember_commit()  # result files name the commit this process loaded, not the one the tree has when they are written


def __getattr__(name: str):
    """``attnprune.PrunedKVCache`` is imported on first use: it subclasses transformers' ``Cache``, and
    importing attnprune must not need transformers."""
    if name == "PrunedKVCache":
        from .cache import PrunedKVCache

        return PrunedKVCache
    raise AttributeError(f"module 'attnprune' has no attribute {name!r}")

__all__ = [
    "observe", "make_mask", "apply", "attach", "detach", "attached_backend", "outside_counts", "finetune", "TrainConfig",
    "PrunedKVCache", "OutsideCalibrationWarning", "decode_greedy", "GraphCaptureError",
    "AttentionStats", "PruneMask", "SiteInfo",
    "AttnPruneError", "CorruptFileError", "EmptyDatasetError", "InvalidArgumentError", "LengthError",
    "MaskMismatchError", "MissingDependencyError", "NoAttentionSitesError", "NonFiniteAttentionError",
    "UnsupportedModelError",
]
