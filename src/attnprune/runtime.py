"""Where and how a run executes: device choice, distributed set-up, autocast policy, backend choice.

One rule each, used by training, observation, evaluation, the benchmarks and the experiments:

- :func:`default_device`: the given device, else ``cuda:<local rank>`` when a GPU is present, else the CPU;
- :func:`init_distributed` / :func:`dist_info`: ``torch.distributed`` under ``torchrun`` (NCCL on GPUs,
  gloo on the CPU); :func:`all_reduce_sum` and :func:`barrier` are no-ops in a single process;
- :func:`autocast_policy`: bf16 autocast or full precision for a ``precision`` setting on a device;
- :func:`resolve_backend`: the attention backend ``"auto"`` stands for on a device.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, ContextManager

import torch

from .errors import AttnPruneError, InvalidArgumentError

PRECISIONS = ("auto", "fp32", "bf16")


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given; else ``cuda:<local rank>`` when a GPU is present (rank 0 outside
    ``torchrun``), else the CPU. The one rule every command uses."""
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_distributed() -> tuple[int, int]:
    """Initialise ``torch.distributed`` when launched by ``torchrun`` (``WORLD_SIZE`` > 1).

    Uses NCCL when CUDA is available, gloo otherwise. Returns ``(rank, world_size)``; ``(0, 1)``
    when not launched distributed. Safe to call when already initialised.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_available():
        raise AttnPruneError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(values: list[float], device: torch.device, world: int) -> list[float]:
    """Sum ``values`` over all ranks (float64 on ``device``); returned unchanged when ``world == 1``."""
    if world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(world: int) -> None:
    """Wait for every rank (nothing to wait for when ``world == 1``)."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def autocast_policy(precision: str, device: torch.device) -> tuple[Callable[[], ContextManager], bool]:
    """``(make_context, bf16)`` for a precision setting on ``device``.

    precision: ``"auto"`` (bf16 autocast on a CUDA GPU that supports it, else full precision),
        ``"fp32"`` or ``"bf16"`` (autocast on any device, the CPU included, when asked explicitly).
    ``make_context()`` returns a fresh context manager for one forward pass.
    """
    if precision not in PRECISIONS:
        raise InvalidArgumentError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    use_bf16 = precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    if not use_bf16:
        return contextlib.nullcontext, False
    return (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)), True


def resolve_backend(name: str, device: torch.device) -> str:
    """``"auto"``: the fastest backend that loads on ``device`` (``attnprune.backends.resolve_backend``:
    flash on sm90+ with FlashAttention-4, else triton on CUDA, else reference); any other name as given."""
    from .backends import resolve_backend as resolve

    return resolve(name, device)
