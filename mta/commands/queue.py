"""`mta queue stats|list|show`: look at the spool of a running or stopped engine."""

from __future__ import annotations

import argparse
import time
from collections import Counter
from typing import Any

from mta.commands.common import add_config_arg, config_from, fail, print_json, print_table
from mta.queue.spool import QUEUED, Spool, job_state


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("queue", help="inspect the spool")
    qsub = p.add_subparsers(dest="queue_command", required=True)
    stats = qsub.add_parser("stats", help="counts by state and by destination domain")
    listing = qsub.add_parser("list", help="queued messages, oldest first")
    listing.add_argument("--limit", type=int, default=100)
    show = qsub.add_parser("show", help="one message with its per-recipient state")
    show.add_argument("id")
    for q in (stats, listing, show):
        add_config_arg(q)
        q.add_argument("--json", action="store_true", help="print JSON")
    stats.set_defaults(func=run_stats)
    listing.set_defaults(func=run_list)
    show.set_defaults(func=run_show)


def open_spool(args: argparse.Namespace) -> Spool:
    cfg = config_from(args)
    return Spool(cfg.spool.path, cfg.spool.map_size, readonly=True)


def queue_stats(spool: Spool) -> dict[str, Any]:
    by_state: Counter[str] = Counter()
    by_domain: dict[str, Counter[str]] = {}
    recipients = 0
    with spool.read() as txn:
        for _, job in spool.jobs(txn):
            state = job_state(job)
            waiting = sum(1 for r in job["rcpts"] if r[1] == QUEUED)
            recipients += waiting
            by_state[state] += 1
            by_domain.setdefault(job["domain"], Counter())[state] += 1
    return {
        "total": spool.count("msg"),
        "jobs": sum(by_state.values()),
        "recipients": recipients,
        "by_state": dict(by_state),
        "by_domain": {d: dict(c) for d, c in sorted(by_domain.items(), key=lambda x: -x[1].total())},
    }


def run_stats(args: argparse.Namespace) -> int:
    try:
        spool = open_spool(args)
    except FileNotFoundError as exc:
        return fail(str(exc))
    stats = queue_stats(spool)
    if args.json:
        print_json(stats)
        return 0
    print(f"messages: {stats['total']}  delivery jobs: {stats['jobs']}  "
          f"recipients waiting: {stats['recipients']}")
    print_table(["state", "jobs"], sorted(stats["by_state"].items()))
    print()
    print_table(["domain", "queued", "deferred", "held"],
                [[d, c.get("queued", 0), c.get("deferred", 0), c.get("held", 0)]
                 for d, c in list(stats["by_domain"].items())[:50]])
    return 0


def message_summary(message: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in message.items() if k != "data"}


def run_list(args: argparse.Namespace) -> int:
    try:
        spool = open_spool(args)
    except FileNotFoundError as exc:
        return fail(str(exc))
    rows = []
    with spool.read() as txn:
        for message in spool.messages(txn):
            rows.append(message_summary(message))
            if len(rows) >= args.limit:
                break
    if args.json:
        print_json(rows)
        return 0
    print_table(["id", "received", "from", "rcpts", "account", "campaign", "size"], [
        [m["id"], time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m["received"])),
         m["from"] or "<>", len(m["rcpts"]), m["account"], m["campaign"], m["size"]]
        for m in rows])
    return 0


def run_show(args: argparse.Namespace) -> int:
    try:
        spool = open_spool(args)
    except FileNotFoundError as exc:
        return fail(str(exc))
    with spool.read() as txn:
        message = spool.get_message(txn, args.id)
        if message is None:
            return fail(f"no message {args.id!r} in the spool")
        jobs = [job for key, job in _jobs_of(spool, txn, args.id)]
    info = message_summary(message) | {"jobs": jobs}
    if args.json:
        print_json(info)
        return 0
    for key in ("id", "from", "account", "campaign", "msgid", "size", "client"):
        print(f"{key:9} {info.get(key)}")
    print(f"{'received':9} {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info['received']))}")
    print_table(["recipient", "state", "code", "reply", "attempts", "next attempt"], [
        [r[0], r[1], r[2], (r[3] or "")[:60], job["attempts"],
         time.strftime("%H:%M:%S", time.localtime(job["next"] / 1000))]
        for job in jobs for r in job["rcpts"]])
    return 0


def _jobs_of(spool: Spool, txn: Any, message_id: str) -> Any:
    prefix = message_id.encode() + b"."
    cursor = txn.cursor(db=spool.dbs["job"])
    if not cursor.set_range(prefix):
        return
    for key in cursor.iternext(keys=True, values=False):
        if not key.startswith(prefix):
            return
        yield key, spool.get_job(txn, key)
