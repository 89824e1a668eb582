"""`moekit <command>`: argparse -> config -> call. The only module that prints.

Each command is a function decorated with ``@command``: it receives the parsed arguments.
Heavy imports happen inside the command so `moekit --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable]] = {}


def command(name: str, help: str, args: Callable[[argparse.ArgumentParser], None] = lambda p: None):
    """Register ``fn(ns)`` as ``moekit NAME``; ``args(parser)`` declares its arguments."""

    def register(fn: Callable) -> Callable:
        _COMMANDS[name] = (help, args, fn)
        return fn

    return register


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


# ----------------------------------------------------------------------------- commands
# (one block per command; keep each block self-contained)


# ----------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moekit", description="Mixture-of-Experts transformers toolkit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, add_args, _fn) in _COMMANDS.items():
        add_args(sub.add_parser(name, help=help_, description=help_))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 0
    try:
        rc = _COMMANDS[ns.command][2](ns)
    except (ValueError, FileNotFoundError) as e:  # our errors name the argument; no traceback for users
        print(f"moekit {ns.command}: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
