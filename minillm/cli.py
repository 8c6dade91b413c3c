"""The `minillm` command line: a thin layer over the library (subcommands are added per feature)."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .errors import MiniLLMError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minillm",
        description="StreamingLLM in pure PyTorch: attention sinks + a rolling KV window.")
    parser.add_argument("--version", action="version", version=f"minillm {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except MiniLLMError as e:
        print(f"minillm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
