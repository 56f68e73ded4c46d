"""`mta webhook status|dead|replay NAME`: the event outbox's sinks ([[webhooks]], [[amqp]]).

Through a running engine's admin API when a token is known (status then has the
dispatcher's live figures: events delivered, the last error, the next attempt), else
reading and writing the spool directly (see mta/commands/remote.py).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from mta.commands.common import add_config_arg, config_from, print_table
from mta.commands.remote import CommandError, add_api_args, either
from mta.http.client import AdminClient, segment
from mta.outbox import status
from mta.outbox.status import UnknownSink
from mta.policy.offline import OfflineSession
from mta.queue.spool import Spool


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("webhook", help="event outbox sinks: backlog, dead letters, replay")
    wsub = p.add_subparsers(dest="webhook_command", required=True)
    show = wsub.add_parser("status", help="each sink's backlog, dead letters, last error")
    show.add_argument("name", nargs="?", help="only this sink")
    dead = wsub.add_parser("dead", help="a sink's dead letters (events it never took)")
    dead.add_argument("name")
    dead.add_argument("--limit", type=int, default=100)
    replay = wsub.add_parser("replay", help="send a sink's dead letters again (same ids)")
    replay.add_argument("name")
    for q in (show, dead, replay):
        add_config_arg(q)
        q.add_argument("--json", action="store_true", help="print JSON")
        add_api_args(q)
    show.set_defaults(func=either(offline_status, online_status, show_status))
    dead.set_defaults(func=either(offline_dead, online_dead, show_dead))
    replay.set_defaults(func=either(offline_replay, online_replay, show_replay))


def with_spool(args: argparse.Namespace, read: Any) -> Any:
    cfg = config_from(args)
    spool = Spool(cfg.spool.path, cfg.spool.map_size, readonly=True)
    try:
        return read(cfg, spool)
    finally:
        spool.close()


def only(rows: list[dict[str, Any]], name: str | None) -> list[dict[str, Any]]:
    if name is None:
        return rows
    chosen = [row for row in rows if row["name"] == name]
    if not chosen:
        raise CommandError(f"no sink named {name!r} in [[webhooks]] or [[amqp]]")
    return chosen


def offline_status(args: argparse.Namespace) -> list[dict[str, Any]]:
    return only(with_spool(args, lambda cfg, spool: status.sink_rows(spool, cfg, time.time())),
                args.name)


def online_status(client: AdminClient, args: argparse.Namespace) -> list[dict[str, Any]]:
    return only(client.get("webhooks")["sinks"], args.name)


def offline_dead(args: argparse.Namespace) -> list[dict[str, Any]]:
    try:
        return with_spool(args, lambda cfg, spool: status.dead_rows(spool, cfg, args.name,
                                                                    args.limit))
    except UnknownSink as exc:
        raise CommandError(str(exc)) from None


def online_dead(client: AdminClient, args: argparse.Namespace) -> list[dict[str, Any]]:
    return client.get(f"webhooks/{segment(args.name)}/dead?limit={args.limit}")["dead"]


def offline_replay(args: argparse.Namespace) -> dict[str, Any]:
    cfg = config_from(args)
    try:
        status.require_sink(cfg, args.name)
    except UnknownSink as exc:
        raise CommandError(str(exc)) from None
    with OfflineSession(cfg, write=True) as s:
        replayed = s.write(status.replay_op(s.spool, cfg, args.name))
        s.audit("webhook.replay", args.name, replayed=replayed)
    return {"sink": args.name, "replayed": replayed}


def online_replay(client: AdminClient, args: argparse.Namespace) -> dict[str, Any]:
    return client.post(f"webhooks/{segment(args.name)}/replay")


def clock(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def show_status(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("no sink configured ([[webhooks]] or [[amqp]])")
        return
    print_table(["sink", "kind", "target", "pending", "dead", "delivered", "last error",
                 "next attempt"],
                [[r["name"], r["kind"], r["target"], r["pending"], r["dead"],
                  r.get("delivered", "-"), r.get("last_error") or "-",
                  clock(r.get("next_attempt"))] for r in rows])


def show_dead(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("no dead letters")
        return
    print_table(["failed", "type", "id", "account", "campaign", "recipient", "reason"],
                [[clock(r["failed_at"]), r["type"], r["id"], r["account"], r["campaign"],
                  r["recipient"], r["reason"]] for r in rows])


def show_replay(result: dict[str, Any]) -> None:
    print(f"{result['replayed']} dead letters of {result['sink']} back in the outbox")
