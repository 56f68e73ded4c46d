"""`mta serve`: run the engine."""

from __future__ import annotations

import argparse

from mta.commands.common import add_config_arg, config_from


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the engine")
    add_config_arg(p)
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: [engine] workers, 0 = one per core)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mta import engine

    return engine.serve(config_from(args), args.workers)
