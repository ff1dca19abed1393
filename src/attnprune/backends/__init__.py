"""Backends: how masked attention is computed for one site. A small registry of functions::

    backend(q, k, v, site_mask, *, attn_mask=None, is_causal=False, scale=None, dropout_p=0.0,
            q_offset=0, beyond="error", positions=None[, sinks=, softcap=]) -> Tensor[B, Hq, Lq, Dv]

q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]``; v: ``[B, Hkv, Lk, Dv]``; ``site_mask``: the site's
``SiteMask``. ``attn_mask``: None, bool (True = may attend) or additive float, broadcastable to
``[B, Hq, Lq, Lk]``. ``is_causal``: key ``j`` is visible to query ``i`` only if ``j <= i + q_offset``.
``q_offset``: position of the first query in mask coordinates (``Lk - Lq`` for causal sites with a
KV cache). ``positions``: None, or ``(q_pos [B or 1, Lq], k_pos [B or 1, Lk])`` long tensors giving
each query's and key's position in its own sequence (left-padded batches, sliding-window caches);
then ``q_offset`` is unused and mask entry ``(q_pos[b, i], k_pos[b, j])`` applies. Pruned entries get
exactly ``-inf`` before the softmax; a row with nothing left is 0. ``sinks``: ``[Hq]`` attention-sink
logits in every row's denominator; ``softcap``: scores capped to ``c * tanh(x / c)``
(:mod:`attnprune.softmax`); each passed only for models that have it, so a backend registered without
these keywords serves every other model.

``"reference"`` (dense, any device) is always registered; ``"triton"``, ``"flex"``, ``"flash"``
(FlashAttention-4, sm90+) and ``"gather"`` (block-sparse in PyTorch ops, any device) are imported on first use. ``"auto"`` (:data:`AUTO`) picks one per device:
:func:`resolve_backend`.
"""

from __future__ import annotations

import importlib

from ..errors import MissingDependencyError
from ..registry import Registry

_LAZY = {"triton": "attnprune.backends.triton", "flex": "attnprune.backends.flex", "flash": "attnprune.backends.flash",
         "gather": "attnprune.backends.gather"}
AUTO = "auto"


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except Exception:  # noqa: BLE001 - a broken optional install counts as absent
        return False


def resolve_backend(name: str, device=None) -> str:
    """The backend name ``name`` stands for on ``device``: ``name`` itself unless it is ``"auto"``;
    then ``"flash"`` where ``flash_attn.cute`` imports and ``device`` is a CUDA device of compute
    capability >= 9.0, else ``"triton"`` where Triton imports and ``device`` is CUDA, else
    ``"reference"``. ``device``: None = the current CUDA device if there is one, else the CPU."""
    if name != AUTO:
        return name
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        if torch.cuda.get_device_capability(device) >= (9, 0) and _importable("flash_attn.cute"):
            return "flash"
        if _importable("triton"):
            return "triton"
    return "reference"


class _BackendRegistry(Registry):
    """A ``Registry`` that imports the optional backend modules the first time they are asked for."""

    def get(self, name: str):
        if name == AUTO:
            name = resolve_backend(name)
        if name == "flash" and not _importable("flash_attn.cute"):
            raise MissingDependencyError(
                "backend 'flash' needs FlashAttention-4 (flash_attn.cute does not import) and an sm90+ GPU "
                "(pip install 'attnprune[hopper]'); use backend='triton' or 'reference' meanwhile")
        if name not in self and name in _LAZY:
            try:
                importlib.import_module(_LAZY[name])
            except ImportError as e:
                if name == "flash":
                    raise MissingDependencyError(
                        f"backend 'flash' cannot be loaded ({e}); it needs FlashAttention-4 and an sm90+ GPU "
                        f"(pip install 'attnprune[hopper]'); use backend='triton' or 'reference' meanwhile") from None
                raise MissingDependencyError(
                    f"backend {name!r} cannot be loaded ({e}); it needs a CUDA GPU with Triton "
                    f"(pip install 'attnprune[kernels]'); use backend='reference' meanwhile") from None
        return super().get(name)

    def names(self) -> list[str]:
        return sorted(set(super().names()) | set(_LAZY))

    def __iter__(self):
        return iter(self.names())


BACKENDS: Registry = _BackendRegistry("backend")

from .reference import reference_backend  # noqa: E402  (registers "reference")

__all__ = ["BACKENDS", "AUTO", "reference_backend", "resolve_backend"]
