"""`mta hold list|release|reject`: mail held for review (trial accounts) and other held mail.

`release` puts a held message back in delivery (due now); `reject` removes it with a
Rejected event per recipient. An ID is a message id (all its held jobs) or a job id
(``<message id>.<n>``). Through a running engine's admin API, or on the spool directly
(see mta/commands/remote.py).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from mta.commands.common import add_config_arg, config_from, print_table
from mta.commands.remote import CommandError, add_api_args, either, require_account
from mta.http.client import MAX_LIMIT, AdminClient, segment
from mta.policy import operations
from mta.policy.model import REVIEW
from mta.policy.offline import OfflineSession
from mta.queue.jobs import RcptState

Row = dict[str, Any]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hold", help="held mail: list, release, reject")
    hsub = p.add_subparsers(dest="hold_command", required=True)
    listing = hsub.add_parser("list", help="every held message, with why it is held")
    listing.add_argument("--account", help="only this account's mail")
    listing.add_argument("--reason", default=None,
                         help="only mail held for this reason: review (trial accounts), "
                              "campaign:ACCOUNT/ID (a paused campaign), account:NAME (a "
                              "suspended or deleted account)")
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
        add_api_args(q)
    listing.set_defaults(func=either(offline_list, online_list, show_list))
    release.set_defaults(func=either(offline_release, online_release, show_released))
    reject.set_defaults(func=either(offline_reject, online_reject, show_rejected))


def wanted(args: argparse.Namespace) -> str | None:
    """The hold reason the command is about (None: any). `list` shows every reason
    unless --reason names one; `release` and `reject` are about review unless --any."""
    if "reason" in args:
        return args.reason
    return None if args.any else REVIEW


# --- list --------------------------------------------------------------------------------------

def offline_list(args: argparse.Namespace) -> list[Row]:
    with OfflineSession(config_from(args)) as s:
        def rows(txn: Any) -> list[Row]:
            if args.account is not None:
                s.require_account(txn, args.account)
            return operations.list_held(s.store, txn, wanted(args), args.account, args.limit)

        return s.read(rows)


def held_jobs(client: AdminClient, args: argparse.Namespace) -> list[Row]:
    """The API's held jobs (one row per job) of the reason and account asked for."""
    reason, account = wanted(args), getattr(args, "account", None)
    return [r for r in client.get(f"held?limit={MAX_LIMIT}")
            if reason in (None, r["reason"]) and account in (None, r["account"])]


def online_list(client: AdminClient, args: argparse.Namespace) -> list[Row]:
    """One row per message, as `operations.list_held` makes them."""
    require_account(client, args.account)
    rows: dict[str, Row] = {}
    for job in held_jobs(client, args):
        row = rows.get(job["message"])
        if row is None:
            if len(rows) >= args.limit:
                break
            message = client.get(f"messages/{segment(job['message'])}")
            row = rows[job["message"]] = {
                "id": job["message"], "account": job["account"], "campaign": job["campaign"],
                "from": message["from"], "received": message["received"],
                "size": message["size"], "reason": job["reason"], "jobs": [],
                "recipients": []}
        row["jobs"].append(job["job"])
        row["recipients"] += [r for r in job["recipients"] if r not in row["recipients"]]
    return list(rows.values())


# --- release / reject --------------------------------------------------------------------------

def _change(args: argparse.Namespace, action: str, fn: Any) -> Row:
    with OfflineSession(config_from(args), write=True) as s:
        result = fn(s)
        s.audit(f"hold.{action}", args.id)
    return result


def offline_release(args: argparse.Namespace) -> Row:
    def release(s: OfflineSession) -> Row:
        count = s.write(lambda txn: operations.release_held(s.store, txn, args.id, s.now(),
                                                       wanted(args)))
        s.emit({"type": "HeldReleased", "id": args.id, "jobs": count})
        return {"id": args.id, "released": count}

    return _change(args, "release", release)


def offline_reject(args: argparse.Namespace) -> Row:
    def reject(s: OfflineSession) -> Row:
        removed = s.write(lambda txn: operations.reject_held(s.store, txn, args.id, wanted(args)))
        for event in operations.removed_events(removed, "Rejected", "rejected in review"):
            s.emit(event)
        recipients = sum(len(job.recipients) for job in removed)
        return {"id": args.id, "jobs": len(removed), "recipients": recipients}

    return _change(args, "reject", reject)


def jobs_named(client: AdminClient, args: argparse.Namespace) -> list[Row]:
    """The held jobs an ID names (a message's or one job), as `operations.release_held` finds."""
    key = "job" if "." in args.id else "message"
    found = [r for r in held_jobs(client, args) if r[key] == args.id]
    if not found:
        raise CommandError(f"no mail held for review with id {args.id!r}")
    return found


def online_release(client: AdminClient, args: argparse.Namespace) -> Row:
    jobs = jobs_named(client, args)
    for job in jobs:
        client.post(f"held/{segment(job['job'])}/release")
    return {"id": args.id, "released": len(jobs)}


def online_reject(client: AdminClient, args: argparse.Namespace) -> Row:
    jobs = {r["job"] for r in jobs_named(client, args)}
    message = client.get(f"messages/{segment(args.id.partition('.')[0])}")
    recipients = sum(1 for job in message["jobs"] if job["job"] in jobs
                     for r in job["rcpts"] if r[1] == RcptState.QUEUED)
    for job in sorted(jobs):
        client.post(f"held/{segment(job)}/reject")
    return {"id": args.id, "jobs": len(jobs), "recipients": recipients}


# --- output ------------------------------------------------------------------------------------

def show_list(rows: list[Row]) -> None:
    print_table(["id", "received", "account", "campaign", "from", "rcpts", "reason"], [
        [r["id"], time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["received"] or 0)),
         r["account"], r["campaign"], r["from"] or "<>", len(r["recipients"]), r["reason"]]
        for r in rows])


def show_released(r: Row) -> None:
    print(f"{r['id']}: {r['released']} jobs released")


def show_rejected(r: Row) -> None:
    print(f"{r['id']}: rejected, {r['recipients']} recipients not sent")

