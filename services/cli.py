"""The `medhash` command line: one command, subcommands contributed by each package.

Packages register subcommands under the ``medhash.commands`` entry-point group; each
``register(subparsers)`` adds its parser and sets ``func``. Heavy libraries are imported inside the
command functions, so ``medhash --help`` stays fast.
"""
from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points

from medhash.services.errors import MedhashError


def code_lengths(text: str) -> tuple[int, ...]:
    """An argparse type: "32,64,128" -> (32, 64, 128); the lengths themselves are checked by ``codes.bits``."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"code lengths are comma-separated whole numbers, e.g. 32,64,128; got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medhash", description="Cross-modal medical image and report retrieval with hash codes."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for entry in sorted(entry_points(group="medhash.commands"), key=lambda e: e.name):
        entry.load()(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except MedhashError as exc:
        print(f"medhash: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medhash: interrupted; finished work is kept and the next run resumes", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
