"""``aigisctl``: the operator's command line (talks to the core; ``check`` works offline).

Exit codes follow LSB: 0 ok, 1 error, 2 usage, 3 not running.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from aigis._version import __version__

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_RUNNING = 0, 1, 2, 3
DEFAULT_CONFIG = "/etc/aigis/aigis.toml"


def build_parser() -> argparse.ArgumentParser:
    """The ``aigisctl`` command line."""
    parser = argparse.ArgumentParser(prog="aigisctl", description="Control and inspect AIGIS.")
    parser.add_argument("--version", action="version", version=f"aigisctl {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    check = commands.add_parser("check", help="validate a config and its plugin manifests")
    check.add_argument(
        "-c",
        "--config",
        default=os.environ.get("AIGIS_CONFIG", DEFAULT_CONFIG),
        help="config file (default: $AIGIS_CONFIG or %(default)s)",
    )
    check.add_argument("-q", "--quiet", action="store_true", help="print problems only")
    return parser


def cmd_check(args: argparse.Namespace) -> int:
    """Validate without starting anything; one line per problem."""
    from aigis._check import check_config

    report = check_config(Path(args.config))
    for line in report.errors:
        print(f"error: {line}", file=sys.stderr)
    for line in report.warnings:
        print(f"warning: {line}", file=sys.stderr)
    if not args.quiet:
        for line in report.notes:
            print(line)
    if report.errors:
        print(f"{args.config}: {len(report.errors)} problem(s)", file=sys.stderr)
        return EXIT_ERROR
    if not args.quiet:
        print(f"{args.config}: ok")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``aigisctl``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_usage(sys.stderr)
        return EXIT_USAGE
    handler = globals()[f"cmd_{args.command}"]
    try:
        return handler(args)
    except KeyboardInterrupt:
        return EXIT_ERROR
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
