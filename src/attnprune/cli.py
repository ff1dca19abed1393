"""The ``attnprune`` command. Thin: parses arguments, calls the library, prints.

Subcommands live in ``attnprune.commands.<name>`` modules; each module defines
``register(subparsers)`` which adds its parser and sets ``func`` (called with the parsed args,
returns an exit status). Add a module to ``COMMAND_MODULES`` to add a subcommand.

``--quiet`` works before and after every subcommand (``attnprune --quiet observe ...`` and
``attnprune observe ... --quiet``); ``--device`` and ``--seed`` are options of the subcommands
that have them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import AttnPruneError

COMMAND_MODULES = [
    "attnprune.commands.core",  # observe, mask, info
    "attnprune.commands.finetune",  # finetune
    "attnprune.commands.eval",  # eval
    "attnprune.commands.demo",  # demo
    "attnprune.commands.bench",  # bench (GPU)
    "attnprune.commands.translate",  # translate (translation experiment)
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnprune",
        description="Data-informed static attention sparsity (Attention Pruning) for PyTorch models.",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for mod_name in COMMAND_MODULES:
        importlib.import_module(mod_name).register(sub)
    for p in sub.choices.values():  # also after the subcommand; SUPPRESS keeps a --quiet given before it
        p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
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
    return int(status or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
