"""`mta throttle status|check|explain`: what the traffic shaping is doing and would do.

`status` goes through a running engine's admin API, or reads the saved snapshots
directly (see mta/commands/remote.py); `check` and `explain` read the shaping file.
"""

from __future__ import annotations

import argparse
import time
from contextlib import closing
from typing import Any

import lmdb

from mta.commands.common import add_config_arg, config_from, print_table
from mta.commands.remote import add_api_args, either
from mta.config import Config
from mta.queue.spool import Spool
from mta.throttle import Throttle, load_shaping, load_snapshots
from mta.throttle.units import format_duration, format_rate

STALE_AFTER = 10.0  # seconds without a new snapshot: the worker is probably gone


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("throttle", help="traffic shaping: live state, shaping file checks")
    tsub = p.add_subparsers(dest="throttle_command", required=True)
    status = tsub.add_parser("status", help="each destination's limits now, why, until when")
    status.add_argument("--json", action="store_true", help="print JSON")
    check = tsub.add_parser("check", help="validate the shaping file")
    explain = tsub.add_parser("explain", help="which limits apply to a recipient domain")
    explain.add_argument("domain")
    explain.add_argument("--mx", action="append", default=[], metavar="HOST",
                         help="an MX host of the domain (repeat, in preference order)")
    explain.add_argument("--workers", type=int, default=0,
                         help="worker processes that deliver (default: from the config)")
    for q in (status, check, explain):
        add_config_arg(q)
    for q in (check, explain):
        q.add_argument("--shaping", help="shaping file (default: [throttle] shaping_file)")
    add_api_args(status)
    status.set_defaults(func=either(
        lambda a: annotate(read_rows(config_from(a))),
        lambda c, a: annotate(c.get("throttle")["rows"]), show_status))
    check.set_defaults(func=run_check)
    explain.set_defaults(func=run_explain)


# --- status ---------------------------------------------------------------------------


def read_rows(cfg: Config) -> list[dict[str, Any]]:
    """The snapshots saved by the workers (FileNotFoundError when there is no store)."""
    if cfg.throttle.state_file:
        try:
            env = lmdb.open(cfg.throttle.state_file, readonly=True, max_dbs=8, lock=True)
        except lmdb.Error as exc:
            raise FileNotFoundError(f"no throttle state at {cfg.throttle.state_file}") from exc
        with closing(env):
            return load_snapshots(env)
    spool = Spool(cfg.spool.path, cfg.spool.map_size, readonly=True)
    try:
        return load_snapshots(spool.env)
    finally:
        spool.close()


def annotate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with their age (and whether stale), sorted by destination, kind, worker."""
    now = time.time()
    for row in rows:
        row["age"] = round(now - row["saved"], 1)
        row["stale"] = row["age"] > STALE_AFTER
    return sorted(rows, key=lambda r: (r["destination"], r["kind"], r["worker"]))


def show_status(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("no throttle state saved (no engine running, or nothing delivered yet)")
        return
    now = time.time()
    print_table(["DESTINATION", "KIND", "WORKER", "STATE", "RATE NOW/CEILING",
                 "CONNECTIONS NOW/MAX/CEILING", "REASON", "UNTIL"],
                [_status_cells(r, now) for r in rows])


def _status_cells(row: dict[str, Any], now: float) -> list[Any]:
    state = row["state"] + (f" (stale {format_duration(row['age'])})" if row["stale"] else "")
    holds = {**{f"campaign {k}": v for k, v in row["campaigns_suspended"].items()},
             **{f"account {k}": v for k, v in row["accounts_suspended"].items()}}
    if holds:
        state += "; " + ", ".join(f"{k} for {format_duration(v - now)}" for k, v in holds.items())
    source = row.get("source")  # an egress source's own limits (mta.egress)
    return [
        row["destination"] + (f" from {source}" if source else ""), row["kind"], row["worker"],
        state,
        f"{format_rate(row['rate'])} / {format_rate(row['rate_ceiling'])}",
        f"{row['connections']} / {row['max_connections']} / {row['max_connections_ceiling']}",
        row["reason"] or "-",
        _until(row["until"], now),
    ]


def _until(until: float | None, now: float) -> str:
    if until is None:
        return "-"
    clock = time.strftime("%H:%M:%S", time.localtime(until))
    return f"{clock} (in {format_duration(until - now)})"


# --- check / explain --------------------------------------------------------------------


def run_check(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    path = args.shaping or cfg.throttle.shaping_file
    shaping = load_shaping(path)
    print(f"{path}: ok: {len(shaping.providers)} providers, {len(shaping.domains)} domain "
          f"overrides, {len(shaping.rules)} rules")
    return 0


def run_explain(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    shaping = load_shaping(args.shaping or cfg.throttle.shaping_file)
    workers = args.workers or cfg.engine.delivery_workers or cfg.engine.workers or 1
    throttle = Throttle(shaping, worker=0, workers=workers)
    dest = throttle.destination(args.domain, args.mx)
    print(f"{dest.domain}: provider {dest.provider or '-'}; {workers} worker(s)")
    rows = []
    for spec in dest.scopes:
        lim = spec.limits
        rows.append([f"{spec.kind} {spec.name}", "yes" if spec.shared else "no",
                     lim.max_connections, lim.max_messages_per_connection,
                     format_rate(lim.message_rate.per_second if lim.message_rate else None),
                     format_rate(lim.connection_rate.per_second if lim.connection_rate else None)])
    print_table(["SCOPE", "SHARED BY WORKERS", "MAX CONNECTIONS", "MESSAGES/CONNECTION",
                 "MESSAGE RATE", "CONNECTION RATE"], rows)
    rules = [r.name for r in shaping.rules if r.provider in (None, dest.provider)]
    print(f"rules: {', '.join(rules) or '-'}")
    return 0
