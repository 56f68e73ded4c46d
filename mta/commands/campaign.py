"""`mta campaign list|show|pause|resume|drop`: campaigns' rates and standing.

Works on a running engine (or a stopped one) by writing to the spool directly; the
workers honour a pause or a resume within a second. A campaign is named by its id
(the X-Campaign-ID header); give --account when two accounts use the same id.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from mta.commands.common import add_config_arg, config_from, fail, print_json, print_table
from mta.policy import admin
from mta.policy.offline import OfflineSession
from mta.policy.rates import fmt_percent


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("campaign", help="campaigns: rates against the contract, pause, resume")
    csub = p.add_subparsers(dest="campaign_command", required=True)
    listing = csub.add_parser("list", help="every campaign with its rates and standing")
    listing.add_argument("--account", help="only this account's campaigns")
    show = csub.add_parser("show", help="one campaign in detail")
    pause = csub.add_parser("pause", help="hold a campaign's mail and refuse new mail for it")
    pause.add_argument("--reason", default="", help="quoted in the refusals")
    resume = csub.add_parser("resume", help="release a campaign's held mail (due now)")
    resume.add_argument("--rearm", action="store_true",
                        help="judge its rates again, counting from now (default: "
                             "automatic pausing stays off for this campaign)")
    drop = csub.add_parser("drop", help="remove a campaign's queued and held mail")
    for q in (show, pause, resume, drop):
        q.add_argument("id", help="the campaign id")
        q.add_argument("--account", help="the campaign's account (when the id is ambiguous)")
    for q in (listing, show, pause, resume, drop):
        add_config_arg(q)
        q.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=run_list)
    show.set_defaults(func=run_show)
    pause.set_defaults(func=run_pause)
    resume.set_defaults(func=run_resume)
    drop.set_defaults(func=run_drop)


def session(args: argparse.Namespace, write: bool = False) -> OfflineSession:
    return OfflineSession(config_from(args), write=write)


def run_list(args: argparse.Namespace) -> int:
    try:
        with session(args) as s:
            rows = s.read(lambda txn: admin.list_campaigns(s.store, txn, s.thresholds,
                                                           args.account))
    except FileNotFoundError as exc:
        return fail(str(exc))
    if args.json:
        print_json(rows)
        return 0
    print_table(
        ["account", "campaign", "status", "sent", "delivered", "hard", "complaints", "unsubs",
         "queued", "held"],
        [[r["account"], r["campaign"], r["status"], r["sent"], r["delivered"],
          pct(r, "hard_bounce"), pct(r, "complaint"), pct(r, "unsubscribe"),
          r["queued"] + r["deferred"], r["held"]] for r in rows])
    return 0


def pct(row: dict[str, Any], rule: str) -> str:
    return fmt_percent(row["rates"][rule] * 100)


def run_show(args: argparse.Namespace) -> int:
    try:
        with session(args) as s:
            def show(txn: Any) -> dict[str, Any]:
                account, campaign = admin.resolve_campaign(s.store, txn, args.id, args.account)
                return admin.show_campaign(s.store, txn, account, campaign, s.thresholds)

            row = s.read(show)
            t = s.thresholds
    except (FileNotFoundError, admin.PolicyError) as exc:
        return fail(str(exc))
    row["thresholds"] = {"hard_bounce": t.hard_bounce_rate / 100,
                         "complaint": t.complaint_rate / 100,
                         "unsubscribe": t.unsubscribe_rate / 100, "min_volume": t.min_volume}
    if args.json:
        print_json(row)
        return 0
    print(f"campaign  {row['campaign']} (account {row['account']})")
    print(f"status    {row['status']}" + (f": {row['reason']}" if row["reason"] else ""))
    if row["since"]:
        print(f"since     {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(row['since']))}"
              f" by {row['by']}")
    print(f"automatic pausing {'on' if row['checks'] else 'off (resumed by an operator)'}")
    print(f"mail      submitted {row['submitted']}, sent {row['sent']}, delivered "
          f"{row['delivered']}, hard bounces {row['hard_bounces']}, soft bounces "
          f"{row['soft_bounces']}, complaints {row['complaints']}, unsubscribes "
          f"{row['unsubscribes']}")
    print_table(["rule", "rate", "threshold"], [
        ["hard bounce (of sent)", pct(row, "hard_bounce"), f">= {fmt_percent(t.hard_bounce_rate)}"],
        ["complaint (of delivered)", pct(row, "complaint"), f"> {fmt_percent(t.complaint_rate)}"],
        ["unsubscribe (of delivered)", pct(row, "unsubscribe"),
         f"> {fmt_percent(t.unsubscribe_rate)}"]])
    print(f"judged after {t.min_volume} sent; in the queue: {row['queued']} queued, "
          f"{row['deferred']} deferred, {row['held']} held")
    return 0


Action = Callable[[OfflineSession, Any, str, str], Any]
After = Callable[[OfflineSession, str, str, Any], tuple[dict[str, Any], str]]


def perform(args: argparse.Namespace, action: str, act: Action, after: After) -> int:
    """Resolve the campaign, act in one write transaction, then record and report."""
    try:
        with session(args, write=True) as s:
            def op(txn: Any) -> tuple[str, str, Any]:
                account, campaign = admin.resolve_campaign(s.store, txn, args.id, args.account)
                return account, campaign, act(s, txn, account, campaign)

            account, campaign, result = s.write(op)
            shown, text = after(s, account, campaign, result)
            s.audit(f"campaign.{action}", f"{account}/{campaign}")
    except (FileNotFoundError, admin.PolicyError) as exc:
        return fail(str(exc))
    if args.json:
        print_json(shown)
    else:
        print(text)
    return 0


def run_pause(args: argparse.Namespace) -> int:
    def act(s: OfflineSession, txn: Any, account: str, campaign: str) -> Any:
        return admin.pause_campaign(s.store, txn, account, campaign, s.by, args.reason, s.now())

    def after(s: OfflineSession, account: str, campaign: str, result: Any
              ) -> tuple[dict[str, Any], str]:
        s.emit({"type": "CampaignPaused", "account": account, "campaign": campaign,
                "rule": "operator", "reason": args.reason, "held": result["held"]})
        return result, (f"campaign {campaign} of {account} paused; {result['held']} waiting "
                        f"jobs held now, due ones as the workers come to them")

    return perform(args, "pause", act, after)


def run_resume(args: argparse.Namespace) -> int:
    def act(s: OfflineSession, txn: Any, account: str, campaign: str) -> Any:
        return admin.resume_campaign(s.store, txn, account, campaign, s.by, s.now(),
                                     rearm=args.rearm)

    def after(s: OfflineSession, account: str, campaign: str, result: Any
              ) -> tuple[dict[str, Any], str]:
        s.emit({"type": "CampaignResumed", "account": account, "campaign": campaign,
                "released": result["released"], "rearm": args.rearm})
        return result, (f"campaign {campaign} of {account} resumed; {result['released']} "
                        f"held jobs released")

    return perform(args, "resume", act, after)


def run_drop(args: argparse.Namespace) -> int:
    def act(s: OfflineSession, txn: Any, account: str, campaign: str) -> Any:
        return admin.drop_campaign(s.store, txn, account, campaign, s.by, s.now())

    def after(s: OfflineSession, account: str, campaign: str, removed: Any
              ) -> tuple[dict[str, Any], str]:
        for event in admin.removed_events(removed, "Dropped", "dropped by an operator"):
            s.emit(event)
        recipients = sum(len(job.recipients) for job in removed)
        s.emit({"type": "CampaignDropped", "account": account, "campaign": campaign,
                "jobs": len(removed), "recipients": recipients})
        result = {"account": account, "campaign": campaign, "jobs": len(removed),
                  "recipients": recipients}
        return result, (f"campaign {campaign} of {account} dropped: {len(removed)} jobs, "
                        f"{recipients} recipients removed")

    return perform(args, "drop", act, after)
