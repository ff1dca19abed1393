"""The kernels' launch configurations: tile sizes, warps and stages per pass and head dim (measured table)."""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["KernelConfig", "CONFIGS", "get_config", "cap_args"]

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters of one kernel (``block_m`` x ``block_n`` tiles)."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    tma: bool = False  # forward only: K/V tiles of unmasked blocks through TMA descriptors (Hopper+)
    prescale: bool = False  # dq/dkdv only: multiply scores by the scale before exp2 instead of an FMA inside


# Measured table (see BENCHMARKS.md / bench/gpu_check.py): key (pass, head_dim) with pass in
# "fwd", "dq", "dkdv". For dkdv, block_m is the query tile and block_n the key tile. Entries are
# clipped to the layout's block size. Anything missing falls back to "default".
# Measured on an H200 (torch 2.11, triton 3.6), bf16, 16k tokens, 50% block density, 128x128 layout
# blocks (bench/gpu_check.py --sweep, 2026-11-28); d=32 and d=256 are untuned guesses.
CONFIGS: dict[tuple[str, int | str], KernelConfig] = {
    ("fwd", "default"): KernelConfig(128, 64, 4, 3),
    ("fwd", 64): KernelConfig(128, 64, 4, 3, True),
    ("fwd", 128): KernelConfig(128, 128, 8, 3, True),
    ("fwd", 256): KernelConfig(64, 64, 8, 2),
    ("dq", "default"): KernelConfig(64, 64, 4, 3),
    ("dq", 64): KernelConfig(64, 64, 4, 3),
    ("dq", 128): KernelConfig(128, 64, 8, 2, False, True),
    ("dq", 256): KernelConfig(64, 32, 8, 2),
    ("dkdv", "default"): KernelConfig(64, 64, 4, 3),
    ("dkdv", 64): KernelConfig(32, 128, 4, 3),
    ("dkdv", 128): KernelConfig(64, 128, 8, 3, False, True),  # A/B rerun, bench/results/h200_ab128_*.json
    ("dkdv", 256): KernelConfig(32, 64, 8, 2),
}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def get_config(kind: str, head_dim: int, block: tuple[int, int]) -> KernelConfig:
    """The launch configuration for pass ``kind`` at ``head_dim``, fitted into layout ``block``."""
    bq, bk = block
    if _interpreting():
        return KernelConfig(bq, bk, 4, 1)
    cfg = CONFIGS.get((kind, head_dim)) or CONFIGS[(kind, "default")]
    return KernelConfig(min(cfg.block_m, bq), min(cfg.block_n, bk), cfg.num_warps, cfg.num_stages, cfg.tma,
                        cfg.prescale)


def cap_args(scale: float, softcap: float | None, q) -> dict:
    """The kernels' soft-capping constants (none without a cap): scores ``CAP_OUT * tanh(q.k * CAP_IN)``
    in the log2 domain, i.e. ``cap * tanh(q.k * scale / cap)`` in natural units. ``FAST_TANH``: the
    hardware ``tanh.approx.f32`` (one MUFU op, relative error about 2^-11) instead of ``exp2`` and a
    division, for fp16 / bf16 inputs on NVIDIA GPUs (their rounding, 2^-8 / 2^-11, is already as coarse);
    ``ATTNPRUNE_FAST_TANH=0`` turns it off. ``q``: the query tensor (its device and dtype decide)."""
    if softcap is None:
        return {}
    import torch

    fast = (q.device.type == "cuda" and torch.version.hip is None and q.dtype in (torch.float16, torch.bfloat16)
            and os.environ.get("ATTNPRUNE_FAST_TANH", "1") != "0" and os.environ.get("TRITON_INTERPRET") != "1")
    return dict(SOFTCAP=True, CAP_IN=float(scale) / float(softcap), CAP_OUT=float(softcap) * _LOG2E,
                FAST_TANH=fast)
