"""What the subcommands share: list options, checks made before any long work (the device, the
outputs, the sweep).

Output checks are :func:`attnprune._io.check_output_file` / ``check_output_dir`` (re-exported here).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from .._io import check_output_dir, check_output_file
from ..errors import InvalidArgumentError
from ..registry import Registry

__all__ = ["usable_device", "check_output_dir", "check_output_file", "check_policies", "add_list_argument",
           "list_items", "use_shared", "SHARED_OPTIONS", "zero_one"]


# --- options every subcommand that uses them takes the same way -------------------------------------
@dataclass(frozen=True)
class SharedOption:
    """One option shared by the subcommands: its flag, argparse keywords and default help (``{default}``
    is filled with the command's default)."""

    flag: str
    kwargs: dict
    help: str


SHARED_OPTIONS: Registry[SharedOption] = Registry("shared option")
SHARED_OPTIONS.add("quiet", SharedOption("--quiet", dict(action="store_true"), "no progress bars"))
SHARED_OPTIONS.add("device", SharedOption("--device", {}, "cpu, cuda, cuda:1 (default: the GPU when present, "
                                                          "else cpu)"))
SHARED_OPTIONS.add("seed", SharedOption("--seed", dict(type=int), "random seed (default {default})"))
SHARED_OPTIONS.add("backend", SharedOption("--backend", {}, "attention backend under the mask: auto (flash on "
                                                            "an sm90+ GPU with FlashAttention-4, else triton on a GPU, else reference), "
                                                            "reference, triton, flex, flash, gather (block-sparse in PyTorch ops, any device) "
                                                            "(default {default})"))
EVERY_COMMAND = {"quiet": (False, None)}  # options every subcommand takes


def use_shared(p: argparse.ArgumentParser, **options) -> None:
    """Declare the shared options subcommand ``p`` takes, each ``name=default`` or ``name=(default, help)``:
    ``use_shared(p, device=None, seed=0, backend="auto")``. ``attnprune.cli`` adds them (and ``--quiet``)
    to ``p`` and to the main parser, so they work after the subcommand and before it."""
    p.set_defaults(_shared={k: v if isinstance(v, tuple) else (v, None) for k, v in options.items()})


def add_shared_options(main: argparse.ArgumentParser, commands: dict[str, argparse.ArgumentParser]) -> None:
    """Add every shared option to ``main`` (given before the subcommand) and to each subcommand that
    declared it (given after it; ``SUPPRESS`` as default, so :func:`fill_shared_defaults` can tell a
    given value from none). A subcommand defining the same flag itself keeps its own option."""
    for name in SHARED_OPTIONS:
        opt = SHARED_OPTIONS.get(name)
        main.add_argument(opt.flag, dest=f"_main_{name}", default=argparse.SUPPRESS,
                          help=opt.help.replace(" (default {default})", "") + " (also after the subcommand)",
                          **opt.kwargs)
    for p in commands.values():
        declared = {**EVERY_COMMAND, **(p.get_default("_shared") or {})}
        own = {}
        for name in SHARED_OPTIONS:
            action = p._option_string_actions.get(SHARED_OPTIONS.get(name).flag)
            if action is not None:
                own[name] = action.default
                declared.pop(name, None)
        p.set_defaults(_shared=declared, _own=own)
        for name, (default, text) in declared.items():
            opt = SHARED_OPTIONS.get(name)
            p.add_argument(opt.flag, default=argparse.SUPPRESS, help=text or opt.help.format(default=default),
                           **opt.kwargs)


def fill_shared_defaults(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """After parsing: a shared option given after the subcommand wins over the same one given before
    it, which wins over the command's default. One given before a subcommand that does not take it
    is an argparse error."""
    shared = getattr(args, "_shared", None) or {}
    own = getattr(args, "_own", None) or {}
    for name in SHARED_OPTIONS:
        key = f"_main_{name}"
        if key not in vars(args):
            continue
        before = vars(args).pop(key)
        if name in shared:
            if name not in vars(args):
                setattr(args, name, before)
        elif name in own:  # the command's own option: its default means it was not given after
            if getattr(args, name, own[name]) == own[name]:
                setattr(args, name, before)
        else:
            parser.error(f"{SHARED_OPTIONS.get(name).flag} is not an option of {args.command}")
    for name, (default, _) in shared.items():
        if name not in vars(args):
            setattr(args, name, default)
    return args


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


def add_list_argument(p, *flags: str, item=str, what: str | None = None, **kw):
    """Add a list option to ``p`` (a parser or an argument group): ``--x 1,2,3``, ``--x 1 2 3`` and
    ``--x 1,2 3`` all give ``(1, 2, 3)``. The default (a tuple, or ``None``) is kept as it is."""
    kw.setdefault("metavar", (what or getattr(item, "__name__", "item")).upper())
    return p.add_argument(*flags, type=list_items(item, what), nargs="+", action=_Flatten, **kw)


def zero_one(text: str) -> bool:
    """``0`` / ``1`` as a bool (``--causal 0,1``)."""
    if text not in ("0", "1"):
        raise ValueError(text)
    return text == "1"


def usable_device(spec: str | None):
    """The ``torch.device`` a command runs on (``runtime.default_device``: ``spec``, else the GPU when
    present, else the CPU), after allocating a tensor there; ``InvalidArgumentError`` if it is unknown
    (``banana``) or absent on this machine (``cuda`` without a GPU, ``cuda:7`` on a 1-GPU host)."""
    import torch

    from ..runtime import default_device

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
