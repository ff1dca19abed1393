"""Counting GPU->CPU synchronisations (``torch.cuda.set_sync_debug_mode``), for benchmarks and tests."""

from __future__ import annotations

import warnings

import torch

__all__ = ["count_syncs"]


def count_syncs(fn) -> tuple[int, list[str]]:
    """Run ``fn()`` with CUDA sync debugging on: ``(number of synchronisations, sorted "file:line"
    of the code that synchronised)``. Needs a CUDA device."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    hits = [x for x in w if "synchroniz" in str(x.message).lower()]
    return len(hits), sorted({f"{x.filename}:{x.lineno}" for x in hits})
