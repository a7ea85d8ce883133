"""`ambitctl`: one entry point, one module per subcommand.

Each module in ``COMMAND_MODULES`` lives at ``cli/<name>.py`` and exposes ``register(subparsers)``, which adds its
parser and sets ``func(args) -> int`` as the parser default. Adding a command is adding its name to the list.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

COMMAND_MODULES = ["lab", "bench", "certs", "explain", "workloads"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ambitctl", description="Operate an Ambit mesh and its local lab.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"cli.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into `head` and the like: the command did its work; silence the flush at exit too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
