"""What the subcommands share: list options, checks made before any long work (the device, the
outputs, the sweep).

Output checks are :func:`attnprune._io.check_output_file` / ``check_output_dir`` (re-exported here).
"""

from __future__ import annotations

import argparse

from .._io import check_output_dir, check_output_file
from ..errors import InvalidArgumentError

__all__ = ["usable_device", "check_output_dir", "check_output_file", "check_policies", "add_list_argument",
           "list_items"]


# --- the one list syntax: items separated by commas, spaces or both (``--x 1,2 3``) ----------------
def list_items(convert=str, what: str | None = None):
    """An argparse ``type`` turning one command-line word ``"a,b"`` into ``(convert("a"), convert("b"))``."""
    what = what or getattr(convert, "__name__", "value")

    def parse(text: str) -> tuple:
        try:
            return tuple(convert(x.strip()) for x in text.split(",") if x.strip())
        except argparse.ArgumentTypeError:
            raise
        except (ValueError, TypeError):
            raise argparse.ArgumentTypeError(f"expected a list of {what} values (commas or spaces between "
                                             f"them), got {text!r}") from None

    parse.__name__ = what
    return parse


class _Flatten(argparse.Action):
    """Store the items of every word of one occurrence as one tuple (the last occurrence wins)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, tuple(item for word in values for item in word))


def add_list_argument(p: argparse.ArgumentParser, *flags: str, item=str, what: str | None = None, **kw):
    """Add a list option: ``--x 1,2,3``, ``--x 1 2 3`` and ``--x 1,2 3`` all give ``(1, 2, 3)``. The
    default (a tuple, or ``None``) is kept as it is."""
    kw.setdefault("metavar", (what or getattr(item, "__name__", "item")).upper())
    return p.add_argument(*flags, type=list_items(item, what), nargs="+", action=_Flatten, **kw)


def zero_one(text: str) -> bool:
    """``0`` / ``1`` as a bool (``--causal 0,1``)."""
    if text not in ("0", "1"):
        raise ValueError(text)
    return text == "1"


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
