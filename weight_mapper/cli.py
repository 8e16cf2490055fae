"""The ``weight-mapper`` command line (also ``python -m weight_mapper``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from weight_mapper.errors import WeightMapperError

__all__ = ["main", "build_parser"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from weight_mapper.demo import run_demo

    return 0 if run_demo(args.workdir, console=Console()) else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every verb."""
    parser = argparse.ArgumentParser(
        prog="weight-mapper",
        description="Infer how the tensors of one PyTorch checkpoint map onto another architecture, and convert it.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="run the built-in example: map an old CNN's checkpoint onto its refactored version")
    demo.add_argument("--workdir", default=None, help="keep the example's checkpoint files in this folder")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the process exit code (0 on success)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except WeightMapperError as exc:
        print(f"weight-mapper: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
