"""The `mta` command: one subcommand module per area, each adding its parser."""

from __future__ import annotations

import argparse
import importlib
import io
import os
import sys
from typing import TextIO

from mta.config import ConfigError, StartupError
from mta.text import shown

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
    "mta.commands.tls",
    "mta.commands.node",
    "mta.commands.webhook",
    "mta.commands.egress",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mta", description="Mail transfer agent and delivery engine")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


class SafeOutput(io.TextIOBase):
    """A command's output as a terminal may show it: names and words from outside (a
    campaign, a bounce's reply) cannot move the cursor, recolour the screen or break
    lines; each line is escaped (mta.text.shown), line ends and tabs are kept."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        lines = text.split("\n")
        self.stream.write("\n".join("\t".join(shown(part) for part in line.split("\t"))
                                    for line in lines))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "serve":  # the engine's own output is its log, not a report
        sys.stdout = SafeOutput(sys.stdout)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"mta: config error: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:  # not the config's fault: an address taken, ...
        print(f"mta: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `mta ... | head`: the reader has all it wanted
        _quiet_stdout()
        return 0


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so that the exit's flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.__stdout__.fileno() if sys.__stdout__ else 1)
