"""`mta account list|show|suspend|resume|delete|purge|hash-password|new-api-key`.

Suspending refuses an account's new mail (550 5.7.1) and holds its queued mail;
resuming releases it (and cancels a deletion not purged yet). Deleting refuses its
mail from now on and schedules the purge of its data `[policy] retention_days` later;
`mta account purge` (from cron, daily) purges every account past its date. `list`,
`show`, `suspend` and `resume` go through a running engine's admin API, or to the spool
directly (see mta/commands/remote.py); `delete` and `purge` always use the spool.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from typing import Any

from mta.commands.campaign import guard_text
from mta.commands.common import add_config_arg, config_from, fail, print_json, print_table
from mta.commands.remote import add_api_args, either
from mta.config import ConfigError
from mta.http.client import MAX_LIMIT, AdminClient, segment
from mta.inject.auth import api_key_hash, new_api_key
from mta.policy import operations
from mta.policy.model import ACTIVE, account_hold
from mta.policy.offline import OfflineSession
from mta.policy.retention import (
    due_accounts,
    log_report,
    purge_account_records,
    purge_event_logs,
)
from mta.smtp.auth import hash_password
from mta.text import shown


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("account", help="accounts: standing, suspension, deletion, passwords")
    asub = p.add_subparsers(dest="account_command", required=True)
    listing = asub.add_parser("list", help="accounts with their plan, standing and volume")
    show = asub.add_parser("show", help="one account with its campaigns")
    suspend = asub.add_parser("suspend", help="refuse its mail and hold what is queued")
    suspend.add_argument("--reason", default="", help="quoted in the refusals")
    resume = asub.add_parser("resume", help="lift a suspension or cancel a deletion")
    delete = asub.add_parser("delete", help="close the account; its data is purged later")
    purge = asub.add_parser("purge", help="purge deleted accounts past their retention")
    purge.add_argument("--settle", type=float, default=2.0,
                       help="seconds to follow the live event log after rewriting it")
    hashpw = asub.add_parser("hash-password", help="print a password hash for the config")
    hashpw.add_argument("--stdin", action="store_true", help="read the password from stdin")
    apikey = asub.add_parser("new-api-key", help="make an injection API key (shown once)")
    apikey.add_argument("name")
    add_config_arg(apikey)
    for q in (show, suspend, resume, delete):
        q.add_argument("name")
    for q in (listing, show, suspend, resume, delete, purge):
        add_config_arg(q)
        q.add_argument("--json", action="store_true", help="print JSON")
    for q in (listing, show, suspend, resume):
        add_api_args(q)
    listing.set_defaults(func=either(offline_list, lambda c, a: c.get("accounts"), show_list))
    show.set_defaults(func=either(offline_show, online_show, show_account))
    suspend.set_defaults(func=either(offline_suspend, online_suspend, show_change))
    resume.set_defaults(func=either(offline_resume, online_resume, show_change))
    delete.set_defaults(func=either(offline_delete, None, show_change))
    purge.set_defaults(func=run_purge)
    hashpw.set_defaults(func=run_hash_password)
    apikey.set_defaults(func=run_new_api_key)


Row = dict[str, Any]


def _row(s: OfflineSession, txn: Any, name: str) -> dict[str, Any]:
    return operations.account_row(s.store, txn, name, s.cfg.account(name), s.monthly_cap(name),
                             s.now())


def when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else ""


# --- list / show ------------------------------------------------------------------------------

def offline_list(args: argparse.Namespace) -> list[Row]:
    with OfflineSession(config_from(args)) as s:
        configured = [a.name for a in s.cfg.accounts]
        return s.read(lambda txn: [
            _row(s, txn, name) for name in operations.known_accounts(s.store, txn, configured)])


def offline_show(args: argparse.Namespace) -> Row:
    with OfflineSession(config_from(args)) as s:
        def show(txn: Any) -> Row:
            s.require_account(txn, args.name)
            row = _row(s, txn, args.name)
            row["campaigns"] = operations.list_campaigns(s.store, txn, s.thresholds, args.name,
                                                    with_jobs=False)
            row["suppressed"] = sum(1 for _ in s.store.suppressions(txn, args.name))
            return row

        return s.read(show)


COUNTERS = ("submitted", "sent", "delivered", "hard_bounces", "soft_bounces", "complaints",
            "unsubscribes")


def counted(campaign: Row) -> bool:
    """Whether the policy store has the campaign (not only mail of it in the queue)."""
    return bool(campaign["status"] != ACTIVE or campaign["since"]
                or any(campaign[k] for k in COUNTERS))


def online_show(client: AdminClient, args: argparse.Namespace) -> Row:
    """The account's row with its campaigns (without queue counts) and suppressions."""
    name = segment(args.name)
    row = client.get(f"accounts/{name}")
    row["campaigns"] = [c | {"queued": 0, "deferred": 0, "held": 0}
                        for c in client.get("campaigns")["campaigns"]
                        if c["account"] == args.name and counted(c)]
    row["suppressed"] = len(client.get(f"suppression/{name}?limit={MAX_LIMIT}")["entries"])
    return row


def show_list(rows: list[Row]) -> None:
    print_table(["name", "plan", "status", "this month", "cap", "sent", "email", "purge after"],
                [[r["name"], r["plan"] or "-", r["status"], r["month_sent"],
                  r["monthly_cap"] or "-", r["totals"]["sent"], r["email"],
                  when(r["purge_after"])] for r in rows])


def show_account(row: Row) -> None:
    for key in ("name", "email", "plan", "subscriber_level", "status", "reason"):
        print(f"{key:17} {row[key]}")
    print(f"{'this month':17} {row['month_sent']} of {row['monthly_cap'] or 'no cap'} "
          f"({row['month']})")
    if row["purge_after"]:
        print(f"{'purge after':17} {when(row['purge_after'])}")
    print(f"{'suppressed':17} {row['suppressed']} addresses")
    if "queue_wait" in row:  # from a running engine: the wait at the account's pace
        print(f"{'queue wait':17} {row['queue_wait']} s")
    print(f"{'totals':17} " + ", ".join(f"{k} {v}" for k, v in row["totals"].items()))
    e = row.get("engagement")
    if e:
        print(f"{'opens':17} unique {e['unique_opens']}, total {e['opens_total']} (human "
              f"{e['opens_human']}, machine {e['opens_machine']})")
        print(f"{'clicks':17} unique {e['unique_clicks']}, total {e['clicks_total']} (human "
              f"{e['clicks_human']}, machine {e['clicks_machine']})")
    print_table(["campaign", "status", "sent", "delivered", "hard", "complaints", "unsubs",
                 "guard"],
                [[c["campaign"], c["status"], c["sent"], c["delivered"], c["hard_bounces"],
                  c["complaints"], c["unsubscribes"], guard_text(c)] for c in row["campaigns"]])


# --- suspend / resume / delete -------------------------------------------------------------

def _change(args: argparse.Namespace, action: str, fn: Any, event: str) -> Row:
    with OfflineSession(config_from(args), write=True) as s:
        def change(txn: Any) -> Row:
            s.require_account(txn, args.name)
            return fn(s, txn)

        result = s.write(change)
        s.emit({"type": event, "account": args.name,
                **{k: v for k, v in result.items() if k != "account"}})
        s.audit(f"account.{action}", args.name)
    return result


def show_change(result: Row) -> None:
    print(f"account {result['account']}: " + ", ".join(
        f"{k} {when(v) if k == 'purge_after' else v}"
        for k, v in result.items() if k != "account"))


def offline_suspend(args: argparse.Namespace) -> Row:
    return _change(args, "suspend", lambda s, txn: operations.suspend_account(
        s.store, txn, args.name, s.by, args.reason, s.now()), "AccountSuspended")


def offline_resume(args: argparse.Namespace) -> Row:
    return _change(args, "resume", lambda s, txn: operations.resume_account(
        s.store, txn, args.name, s.by, s.now()), "AccountResumed")


def offline_delete(args: argparse.Namespace) -> Row:
    return _change(args, "delete", lambda s, txn: operations.delete_account(
        s.store, txn, args.name, s.by, s.now(), s.cfg.policy.retention_days), "AccountDeleted")


def held_for(client: AdminClient, name: str) -> int:
    """How many jobs are held by the account's suspension."""
    return sum(1 for r in client.get(f"held?limit={MAX_LIMIT}")
               if r["reason"] == account_hold(name))


def online_suspend(client: AdminClient, args: argparse.Namespace) -> Row:
    before = held_for(client, args.name)
    client.post(f"accounts/{segment(args.name)}/suspend", {"reason": args.reason})
    return {"account": args.name, "held": held_for(client, args.name) - before}


def online_resume(client: AdminClient, args: argparse.Namespace) -> Row:
    was = client.get(f"accounts/{segment(args.name)}")["status"]  # 404: no such account
    before = held_for(client, args.name)
    client.post(f"accounts/{segment(args.name)}/resume")
    return {"account": args.name, "released": before - held_for(client, args.name),
            "was": was}


def run_purge(args: argparse.Namespace) -> int:
    try:
        with OfflineSession(config_from(args), write=True) as s:
            now = s.now()
            due = s.read(lambda txn: due_accounts(s.store, txn, now))
            reports = []
            for name in due:
                report = s.write(lambda txn, n=name: purge_account_records(s.store, txn, n, now))
                report.event_lines, report.files = purge_event_logs(
                    s.cfg.engine.event_log, {name}, args.settle)
                log_report(report)
                s.audit("account.purge", name)
                reports.append(report.as_dict())
            for r in reports:  # after every rewrite of the event log, so none is lost
                s.emit({"type": "AccountPurged", "purged_account": r["account"],
                        **{k: v for k, v in r.items() if k != "account"}})
    except FileNotFoundError as exc:
        return fail(str(exc))
    if args.json:
        print_json(reports)
    elif not reports:
        print("no account is due for purging")
    for r in [] if args.json else reports:
        print(f"purged {r['account']}: {r['suppressions']} suppression entries, "
              f"{r['counters']} counters, {r['jobs']} queued jobs, {r['event_lines']} event "
              f"lines")
    return 0


def run_hash_password(args: argparse.Namespace) -> int:
    if args.stdin or not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            return fail("the passwords differ")
    if not password:
        return fail("an empty password")
    print(hash_password(password))
    return 0


def run_new_api_key(args: argparse.Namespace) -> int:
    """Print a new key once, and the config line that makes it the account's."""
    try:
        account = config_from(args).account(args.name)
    except ConfigError:
        account = None
    key = new_api_key()
    hashes = [*(account.api_key_hashes if account else []), api_key_hash(key)]
    print(f"API key for account {shown(args.name)} (shown once; keep it secret):\n  {key}")
    print(f"Put this line in its [[accounts]] entry (name = {json.dumps(args.name)}), then "
          "restart the engine:")
    print(f"  api_key_hashes = {json.dumps(hashes)}")
    if account is None:
        print(f"(no account {shown(args.name)} in the config file yet)", file=sys.stderr)
    return 0
