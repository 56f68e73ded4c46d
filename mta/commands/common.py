"""Pieces shared by the subcommands."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from mta.config import CONFIG_ENV, CONFIG_SEARCH, Config, find_config, load_config
from mta.text import shown


def add_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help=f"config file (default: ${CONFIG_ENV}, else the first of "
                             f"{', '.join(CONFIG_SEARCH)} that exists)")


def config_from(args: argparse.Namespace) -> Config:
    return load_config(find_config(args.config))


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(h) for h in headers]] + [["" if c is None else shown(str(c)) for c in r]
                                           for r in rows]  # escaped before widths are taken
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def fail(message: str) -> int:
    print(f"mta: {message}", file=sys.stderr)
    return 2
