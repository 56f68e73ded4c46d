"""`mta hold list|release|reject`: mail held for review (trial accounts) and other held mail.

`release` puts a held message back in delivery (due now); `reject` removes it with a
Rejected event per recipient. An ID is a message id (all its held jobs) or a job id
(``<message id>.<n>``). Works on a running engine by writing to the spool directly.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from mta.commands.common import add_config_arg, config_from, fail, print_json, print_table
from mta.policy import admin
from mta.policy.model import REVIEW
from mta.policy.offline import OfflineSession


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hold", help="held mail: list, release, reject")
    hsub = p.add_subparsers(dest="hold_command", required=True)
    listing = hsub.add_parser("list", help="held messages (default: waiting for review)")
    listing.add_argument("--account", help="only this account's mail")
    listing.add_argument("--all", action="store_true",
                         help="mail held for any reason (paused campaigns, suspended accounts)")
    listing.add_argument("--limit", type=int, default=1000)
    release = hsub.add_parser("release", help="send a held message (due now)")
    reject = hsub.add_parser("reject", help="remove a held message without sending it")
    for q in (release, reject):
        q.add_argument("id", help="message id or job id")
        q.add_argument("--any", action="store_true",
                       help="also mail held for another reason than review")
    for q in (listing, release, reject):
        add_config_arg(q)
        q.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=run_list)
    release.set_defaults(func=run_release)
    reject.set_defaults(func=run_reject)


def run_list(args: argparse.Namespace) -> int:
    reason = None if args.all else REVIEW
    try:
        with OfflineSession(config_from(args)) as s:
            rows = s.read(lambda txn: admin.list_held(s.store, txn, reason, args.account,
                                                      args.limit))
    except FileNotFoundError as exc:
        return fail(str(exc))
    if args.json:
        print_json(rows)
        return 0
    print_table(["id", "received", "account", "campaign", "from", "rcpts", "reason"], [
        [r["id"], time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["received"] or 0)),
         r["account"], r["campaign"], r["from"] or "<>", len(r["recipients"]), r["reason"]]
        for r in rows])
    return 0


def _change(args: argparse.Namespace, action: str, fn: Any) -> int:
    try:
        with OfflineSession(config_from(args), write=True) as s:
            result, text = fn(s)
            s.audit(f"hold.{action}", args.id)
    except (FileNotFoundError, admin.PolicyError) as exc:
        return fail(str(exc))
    if args.json:
        print_json(result)
    else:
        print(text)
    return 0


def run_release(args: argparse.Namespace) -> int:
    reason = None if args.any else REVIEW

    def release(s: OfflineSession) -> tuple[dict[str, Any], str]:
        count = s.write(lambda txn: admin.release_held(s.store, txn, args.id, s.now(), reason))
        s.emit({"type": "HeldReleased", "id": args.id, "jobs": count})
        return {"id": args.id, "released": count}, f"{args.id}: {count} jobs released"

    return _change(args, "release", release)


def run_reject(args: argparse.Namespace) -> int:
    reason = None if args.any else REVIEW

    def reject(s: OfflineSession) -> tuple[dict[str, Any], str]:
        removed = s.write(lambda txn: admin.reject_held(s.store, txn, args.id, reason))
        for event in admin.removed_events(removed, "Rejected", "rejected in review"):
            s.emit(event)
        recipients = sum(len(job.recipients) for job in removed)
        return ({"id": args.id, "jobs": len(removed), "recipients": recipients},
                f"{args.id}: rejected, {recipients} recipients not sent")

    return _change(args, "reject", reject)
