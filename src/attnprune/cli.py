"""The ``attnprune`` command. Thin: parses arguments, calls the library, prints.

Subcommands live in ``attnprune.commands.<name>`` modules; each module defines
``register(subparsers)`` which adds its parser and sets ``func`` (called with the parsed args,
returns an exit status). Add a module to ``COMMAND_MODULES`` to add a subcommand.

Shared options (``commands.common.SHARED_OPTIONS``: ``--quiet``, ``--device``, ``--seed``,
``--backend``) work before and after every subcommand that uses them (``attnprune --quiet observe
...`` and ``attnprune observe ... --quiet``); a subcommand declares the ones it uses, with its
defaults, through ``commands.common.use_shared``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .commands.common import add_shared_options, fill_shared_defaults
from .errors import AttnPruneError

COMMAND_MODULES = [
    "attnprune.commands.core",  # observe, mask, info
    "attnprune.commands.finetune",  # finetune
    "attnprune.commands.eval",  # eval
    "attnprune.commands.demo",  # demo
    "attnprune.commands.bench",  # bench (GPU)
    "attnprune.commands.translate",  # translate (translation experiment)
    "attnprune.commands.generate",  # generate
]


class _Parser(argparse.ArgumentParser):
    """The main parser: fills in the shared options' per-command defaults after parsing."""

    def parse_known_args(self, args=None, namespace=None):
        ns, rest = super().parse_known_args(args, namespace)
        return fill_shared_defaults(self, ns), rest


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="attnprune",
        description="Data-informed static attention sparsity (Attention Pruning) for PyTorch models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=argparse.ArgumentParser)
    sub.required = True
    for mod_name in COMMAND_MODULES:
        importlib.import_module(mod_name).register(sub)
    add_shared_options(parser, sub.choices)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args.func(args)
    except AttnPruneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # a file-system failure the commands' own checks did not foresee
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not _out_of_memory(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: out of memory ({first[:200]}): the run needs more memory than the device has free; lower "
              f"--batch-size or --seq-len (or the number of windows), or use a larger device", file=sys.stderr)
        return 1
    return int(status or 0)


def _out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is torch's out-of-memory error (CUDA or another accelerator); torch is not imported here."""
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    return oom is not None and isinstance(e, oom)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
