"""`mta egress status`: each source's address, EHLO name, pools, up or down, outcome
counts and rates per provider, and warm-up state (mta.egress.status).

Through a running engine's admin API (/api/v1/egress), or read from the spool (see
mta/commands/remote.py)."""

from __future__ import annotations

import argparse
from typing import Any

from mta.commands.common import add_config_arg, config_from, print_table
from mta.commands.remote import add_api_args, either
from mta.egress.status import egress_report
from mta.queue.spool import Spool


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("egress", help="sending sources and pools: state and figures")
    esub = p.add_subparsers(dest="egress_command", required=True)
    status = esub.add_parser("status", help="per source: address, EHLO name, pools, up/down, "
                                            "counts and rates per provider, warm-up")
    status.add_argument("--json", action="store_true", help="print JSON")
    add_config_arg(status)
    add_api_args(status)
    status.set_defaults(func=either(read_report, lambda c, a: c.get("egress"), show_status))


def read_report(args: argparse.Namespace) -> dict[str, Any]:
    cfg = config_from(args)
    spool = Spool(cfg.spool.path, cfg.spool.map_size, readonly=True)
    try:
        return egress_report(cfg, spool)
    finally:
        spool.close()


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}%"


def _warmup(row: dict[str, Any]) -> str:
    warm = row.get("warmup")
    if not warm:
        return "established"
    steps = [f"{provider} step {int(p.get('step', 0)) + 1}/{p.get('steps', '?')} cap "
             f"{p.get('cap') or 'unlimited'} ({p.get('verdict')})"
             for provider, p in sorted(warm.get("providers", {}).items())]
    return "warming" + (": " + "; ".join(steps) if steps else "")


def show_status(report: dict[str, Any]) -> None:
    if not report["sources"]:
        print("no [[egress.sources]]: every message leaves from [delivery] source_address")
        return
    print_table(["SOURCE", "ADDRESS", "EHLO NAME", "POOLS", "STATE", "WARM-UP"],
                [[r["name"], r["address"], r["ehlo_name"], ",".join(r["pools"]) or "-",
                  "up" if r["up"] else f"down: {r['reason']}", _warmup(r)]
                 for r in report["sources"]])
    rows = [[r["name"], provider, p["delivered"], p["deferred"], p["bounced"], p["complained"],
             _pct(p["delivery_rate"]), _pct(p["deferral_rate"]), _pct(p["bounce_rate"]),
             _pct(p["complaint_rate"])]
            for r in report["sources"] for provider, p in r["providers"].items()]
    if rows:
        print()
        print_table(["SOURCE", "PROVIDER", "DELIVERED", "DEFERRED", "BOUNCED", "COMPLAINED",
                     "DELIVERY", "DEFERRAL", "BOUNCE", "COMPLAINT"], rows)
