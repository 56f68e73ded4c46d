"""`mta queue stats|list|show`: the spool of a running engine (through its admin API) or
of a stopped one (read directly); see mta/commands/remote.py for which is used."""

from __future__ import annotations

import argparse
import time
from typing import Any

from mta.commands.common import add_config_arg, config_from, print_table
from mta.commands.remote import CommandError, add_api_args, either
from mta.http.client import AdminClient, segment
from mta.queue.jobs import RcptState
from mta.queue.spool import Spool
from mta.queue.views import message_detail, message_list, queue_stats


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
        add_api_args(q)
    stats.set_defaults(func=either(lambda a: with_spool(a, queue_stats),
                                   lambda c, a: c.get("queue"), show_stats))
    listing.set_defaults(func=either(
        lambda a: with_spool(a, lambda s: message_list(s, a.limit)),
        lambda c, a: c.get(f"messages?limit={a.limit}"), show_list))
    show.set_defaults(func=either(offline_show, online_show, show_message))


def open_spool(args: argparse.Namespace) -> Spool:
    cfg = config_from(args)
    return Spool(cfg.spool.path, cfg.spool.map_size, readonly=True)


def with_spool(args: argparse.Namespace, read: Any) -> Any:
    spool = open_spool(args)
    try:
        return read(spool)
    finally:
        spool.close()


def offline_show(args: argparse.Namespace) -> dict[str, Any]:
    found = with_spool(args, lambda s: message_detail(s, args.id))
    if found is None:
        raise CommandError(f"no message {args.id!r} in the spool")
    return found


def online_show(client: AdminClient, args: argparse.Namespace) -> dict[str, Any]:
    return client.get(f"messages/{segment(args.id)}")


# --- output ----------------------------------------------------------------------------------

def clock(ts: float | None, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    return time.strftime(fmt, time.localtime(ts)) if ts else ""


def show_counts(stats: dict[str, Any]) -> None:
    print(f"messages: {stats['total']}  delivery jobs: {stats['jobs']}  "
          f"recipients waiting: {stats['recipients']}")
    print_table(["state", "jobs"], sorted(stats["by_state"].items()))


def show_stats(stats: dict[str, Any]) -> None:
    show_counts(stats)
    print()
    print_table(["domain", "queued", "deferred", "held"],
                [[d, c.get("queued", 0), c.get("deferred", 0), c.get("held", 0)]
                 for d, c in list(stats["by_domain"].items())[:50]])


def show_list(rows: list[dict[str, Any]]) -> None:
    print_table(["id", "received", "from", "rcpts", "account", "campaign", "size"], [
        [m["id"], clock(m["received"]), m["from"] or "<>", len(m["rcpts"]), m["account"],
         m["campaign"], m["size"]] for m in rows])


def recipient_state(job: dict[str, Any], rcpt: list[Any]) -> str:
    """A recipient's state as `queue stats` counts it: its job's state (queued, deferred,
    held; mta.queue.jobs.JobState) while it waits, else its own (delivered, bounced)."""
    return job["state"] if rcpt[1] == RcptState.QUEUED else rcpt[1]


def show_message(info: dict[str, Any]) -> None:
    for key in ("id", "from", "account", "campaign", "msgid", "size", "client"):
        print(f"{key:9} {info.get(key)}")
    print(f"{'received':9} {clock(info.get('received'))}")
    print_table(["recipient", "state", "code", "attempts", "next attempt", "held", "reply"], [
        [r[0], recipient_state(job, r), r[2], job["attempts"],
         clock(job["next"] / 1000, "%H:%M:%S"), job.get("held") or "", r[3] or ""]
        for job in info["jobs"] for r in job["rcpts"]])
