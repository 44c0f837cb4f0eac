"""The `chorus` console script: serving, client, and training commands in one place."""

from __future__ import annotations

import argparse
import logging
import sys

from chorus import __version__
from chorus.errors import ChorusError


def build_parser() -> argparse.ArgumentParser:
    from chorus import capacity, distill, profile, server, train
    from chorus.client import cli as client_cli
    from chorus.export import cli as export_cli

    parser = argparse.ArgumentParser(prog="chorus", description="Many BERT-like tasks on one backbone, on Triton.")
    parser.add_argument("--version", action="version", version=f"chorus {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    client_cli.register(sub)
    server.register(sub)
    train.register(sub)
    distill.register(sub)
    capacity.register(sub)
    profile.register(sub)
    export_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ChorusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
