"""`python -m bench run|list`: the load-testing toolkit's command line.

    python -m bench run [--scenario NAME] [--count N] [--target HOST:PORT]
                        [--compare postfix|postfix-default|exim|haraka|all]
                        [--rounds N] [--dns-ttl SECONDS] [--dkim]
    python -m bench soak [--duration 600] [--rate 300] [--window 60]
    python -m bench chaos [--duration 3600] [--kill-every 60] [--fault-every 20]
    python -m bench list

See bench/run.py for what a run starts and measures, and bench/scenarios/ for the loads.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bench import chaos, run, soak
from bench.scenarios import ScenarioError, list_scenarios, load_scenario


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    sub = top.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="start a local rig and run a load through it")
    run.add_arguments(run_parser)
    soak_parser = sub.add_parser("soak", help="a long run at a steady rate, window by window")
    soak.add_arguments(soak_parser)
    chaos_parser = sub.add_parser("chaos", help="a fault soak: kill -9 and remote faults; "
                                  "counts accepted, delivered, duplicated, lost")
    chaos.add_arguments(chaos_parser)
    sub.add_parser("list", help="the scenarios in bench/scenarios/")
    return top


def list_command() -> int:
    for name in list_scenarios():
        print(f"{name:12} {load_scenario(name).description}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "list":
            return list_command()
        if args.command == "soak":
            return soak.main(args)
        if args.command == "chaos":
            return chaos.main(args)
        return run.main(args)
    except ScenarioError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
