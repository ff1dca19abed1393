"""Checks the subcommands share, made before any long work: the device, the outputs, the sweep.

Output checks are :func:`attnprune._io.check_output_file` / ``check_output_dir`` (re-exported here).
"""

from __future__ import annotations

from .._io import check_output_dir, check_output_file
from ..errors import InvalidArgumentError

__all__ = ["usable_device", "check_output_dir", "check_output_file", "check_policies"]


def usable_device(spec: str | None):
    """The ``torch.device`` a command runs on (``train.default_device``: ``spec``, else the GPU when
    present, else the CPU), after allocating a tensor there; ``InvalidArgumentError`` if it is unknown
    (``banana``) or absent on this machine (``cuda`` without a GPU, ``cuda:7`` on a 1-GPU host)."""
    import torch

    from ..train import default_device

    try:
        device = default_device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise InvalidArgumentError(f"device {spec!r} is not usable here: it is not a device name; use cpu, "
                                   f"cuda, cuda:1, mps, ...") from None
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError, ValueError, TypeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InvalidArgumentError(f"device {spec!r} is not usable here ({reason}); use cpu, or cuda on a "
                                   f"machine with a GPU") from None
    return device


def check_policies(policies) -> tuple[str, ...]:
    """The policy names, each known to ``attnprune.policies.POLICIES`` (else ``InvalidArgumentError``)."""
    from ..policies import POLICIES

    for p in policies:
        POLICIES.get(p)
    return tuple(policies)
