"""The `mta` command: one subcommand module per area, each adding its parser."""

from __future__ import annotations

import argparse
import importlib
import sys

from mta.config import ConfigError

# Each module has `register(subparsers)`; its parsers set `func(args) -> int`.
COMMAND_MODULES = [
    "mta.commands.serve",
    "mta.commands.queue",
    "mta.commands.dkim",
    "mta.commands.throttle",
    "mta.commands.admin",
    "mta.commands.campaign",
    "mta.commands.hold",
    "mta.commands.suppression",
    "mta.commands.account",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mta", description="Mail transfer agent and delivery engine")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"mta: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
