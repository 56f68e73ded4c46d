"""`mta campaign list|show|pause|resume|drop`: campaigns' rates and standing.

Through a running engine's admin API, or on the spool directly (a stopped engine, no
admin token, or --offline; the workers honour a pause or a resume written there within
a second): see mta/commands/remote.py. A campaign is named by its id (the
X-Campaign-ID header); give --account when two accounts use the same id.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from mta.commands.common import add_config_arg, config_from, print_table
from mta.commands.remote import CommandError, add_api_args, either, require_account
from mta.http.client import MAX_LIMIT, AdminClient, ApiError, segment
from mta.http.operations import config_thresholds
from mta.policy import operations
from mta.policy.offline import OfflineSession
from mta.policy.rates import fmt_percent
from mta.text import shown

Row = dict[str, Any]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("campaign", help="campaigns: rates against the contract, pause, resume")
    csub = p.add_subparsers(dest="campaign_command", required=True)
    listing = csub.add_parser("list", help="every campaign with its rates and standing")
    listing.add_argument("--account", help="only this account's campaigns")
    show = csub.add_parser("show", help="one campaign in detail")
    pause = csub.add_parser("pause", help="hold a campaign's mail and refuse new mail for it")
    pause.add_argument("--reason", default="", help="quoted in the refusals")
    resume = csub.add_parser("resume", help="release a campaign's held mail (due now); the "
                                            "guard judges the mail sent from now on")
    resume.add_argument("--no-guard", metavar="REASON", default="",
                        help="turn automatic pausing off for this campaign (the reason is "
                             "kept in the audit log and shown in every listing)")
    drop = csub.add_parser("drop", help="remove a campaign's queued and held mail")
    for q in (show, pause, resume, drop):
        q.add_argument("id", help="the campaign id")
        q.add_argument("--account", help="the campaign's account (when the id is ambiguous)")
    for q in (listing, show, pause, resume, drop):
        add_config_arg(q)
        q.add_argument("--json", action="store_true", help="print JSON")
        add_api_args(q)
    listing.set_defaults(func=either(offline_list, online_list, show_list))
    show.set_defaults(func=either(offline_show, online_show, show_campaign))
    pause.set_defaults(func=either(offline_pause, online_pause, show_paused))
    resume.set_defaults(func=either(offline_resume, online_resume, show_resumed))
    drop.set_defaults(func=either(offline_drop, online_drop, show_dropped))


def session(args: argparse.Namespace, write: bool = False) -> OfflineSession:
    return OfflineSession(config_from(args), write=write)


# --- reads -------------------------------------------------------------------------------------

def offline_list(args: argparse.Namespace) -> list[Row]:
    with session(args) as s:
        def rows(txn: Any) -> list[Row]:
            if args.account is not None:
                s.require_account(txn, args.account)
            return operations.list_campaigns(s.store, txn, s.thresholds, args.account)

        return s.read(rows)


def online_list(client: AdminClient, args: argparse.Namespace) -> list[Row]:
    require_account(client, args.account)
    return [r for r in client.get("campaigns")["campaigns"]
            if args.account in (None, r["account"])]


def offline_show(args: argparse.Namespace) -> Row:
    with session(args) as s:
        def show(txn: Any) -> Row:
            account, campaign = operations.resolve_campaign(s.store, txn, args.id, args.account)
            return operations.show_campaign(s.store, txn, account, campaign, s.thresholds)

        return s.read(show) | {"thresholds": config_thresholds(s.cfg)}


def online_show(client: AdminClient, args: argparse.Namespace) -> Row:
    return client.get(api_path(client, args))


def api_path(client: AdminClient, args: argparse.Namespace) -> str:
    """campaigns/ACCOUNT/ID, the account found as `operations.resolve_campaign` finds it."""
    account = args.account
    if not account:
        owners = {r["account"] for r in client.get("campaigns")["campaigns"]
                  if r["campaign"] == args.id}
        if not owners:
            raise CommandError(f"no campaign {args.id!r} (give --account to name a new one)")
        if len(owners) > 1:
            raise CommandError(f"campaign {args.id!r} exists for accounts "
                               f"{', '.join(sorted(owners))}: give --account")
        account = owners.pop()
    return f"campaigns/{segment(account)}/{segment(args.id)}"


def current(client: AdminClient, path: str) -> Row:
    """The campaign's row now; a blank active one if the engine knows none yet."""
    try:
        return client.get(path)
    except ApiError as exc:
        if exc.status != 404:
            raise
        return {"status": "active", "held": 0}


# --- actions -----------------------------------------------------------------------------------

Action = Callable[[OfflineSession, Any, str, str], Any]
After = Callable[[OfflineSession, str, str, Any], Row]


def perform(args: argparse.Namespace, action: str, act: Action, after: After,
            **details: Any) -> Row:
    """Resolve the campaign, act in one write transaction, then record and report."""
    with session(args, write=True) as s:
        def op(txn: Any) -> tuple[str, str, Any]:
            account, campaign = operations.resolve_campaign(s.store, txn, args.id, args.account)
            return account, campaign, act(s, txn, account, campaign)

        account, campaign, result = s.write(op)
        shown = after(s, account, campaign, result)
        s.audit(f"campaign.{action}", f"{account}/{campaign}", **details)
    return shown


def offline_pause(args: argparse.Namespace) -> Row:
    def act(s: OfflineSession, txn: Any, account: str, campaign: str) -> Any:
        return operations.pause_campaign(s.store, txn, account, campaign, s.by, args.reason, s.now())

    def after(s: OfflineSession, account: str, campaign: str, result: Any) -> Row:
        s.emit({"type": "CampaignPaused", "account": account, "campaign": campaign,
                "rule": "operator", "reason": args.reason, "held": result["held"]})
        return result

    return perform(args, "pause", act, after)


def online_pause(client: AdminClient, args: argparse.Namespace) -> Row:
    path = api_path(client, args)
    before = current(client, path)
    row = client.post(f"{path}/pause", {"reason": args.reason})
    return {"account": row["account"], "campaign": row["campaign"],
            "held": row["held"] - before["held"]}


def no_guard_reason(args: argparse.Namespace) -> str:
    reason = args.no_guard.strip()
    if args.no_guard and not reason:
        raise CommandError("--no-guard needs the reason to turn automatic pausing off")
    return reason


def offline_resume(args: argparse.Namespace) -> Row:
    no_guard = no_guard_reason(args)

    def act(s: OfflineSession, txn: Any, account: str, campaign: str) -> Any:
        return operations.resume_campaign(s.store, txn, account, campaign, s.by, s.now(),
                                          no_guard)

    def after(s: OfflineSession, account: str, campaign: str, result: Any) -> Row:
        s.emit({"type": "CampaignResumed", "account": account, "campaign": campaign,
                "released": result["released"], "guard": result["guard"],
                **({"no_guard": no_guard} if no_guard else {})})
        return result

    return perform(args, "resume", act, after, **({"no_guard": no_guard} if no_guard else {}))


def online_resume(client: AdminClient, args: argparse.Namespace) -> Row:
    no_guard = no_guard_reason(args)
    path = api_path(client, args)
    before = current(client, path)
    row = client.post(f"{path}/resume", {"no_guard": no_guard} if no_guard else {})
    return {"account": row["account"], "campaign": row["campaign"],
            "released": before["held"] - row["held"], "was": before["status"],
            "guard": row["guard"]}


def offline_drop(args: argparse.Namespace) -> Row:
    def act(s: OfflineSession, txn: Any, account: str, campaign: str) -> Any:
        return operations.drop_campaign(s.store, txn, account, campaign, s.by, s.now())

    def after(s: OfflineSession, account: str, campaign: str, removed: Any) -> Row:
        for event in operations.removed_events(removed, "Dropped", "dropped by an operator"):
            s.emit(event)
        recipients = sum(len(job.recipients) for job in removed)
        s.emit({"type": "CampaignDropped", "account": account, "campaign": campaign,
                "jobs": len(removed), "recipients": recipients})
        return {"account": account, "campaign": campaign, "jobs": len(removed),
                "recipients": recipients}

    return perform(args, "drop", act, after)


def online_drop(client: AdminClient, args: argparse.Namespace) -> Row:
    path = api_path(client, args)
    row = client.get(path)
    recipients = sum(len(m["rcpts"]) for m in client.get(f"messages?limit={MAX_LIMIT}")
                     if m["account"] == row["account"] and m["campaign"] == row["campaign"])
    dropped = client.post(f"{path}/drop")
    return {"account": row["account"], "campaign": row["campaign"],
            "jobs": dropped["dropped"], "recipients": recipients}


# --- output ------------------------------------------------------------------------------------

def percent(fraction: float | None) -> str:
    return "-" if fraction is None else fmt_percent(fraction * 100)


def pct(row: Row, rule: str) -> str:
    return percent(row["rates"].get(rule))


def guard_text(row: Row) -> str:
    """How the guard stands on a campaign: off (and why), not judged yet, or judging."""
    if "guard" not in row:  # the spool alone cannot say (no policy guard running)
        return "-"
    if not row["guard"]:
        return f"off: {row['no_guard']}"
    if not row["judged"]:
        return f"judged after {row['judged_after']} sent ({row['window_sent']} so far)"
    return "on"


def show_list(rows: list[Row]) -> None:
    print_table(
        ["account", "campaign", "status", "sent", "delivered", "hard", "complaints", "unsubs",
         "queued", "held", "guard"],
        [[r["account"], r["campaign"], r.get("status", "paused" if r["paused"] else "active"),
          r["sent"], r["delivered"], pct(r, "hard_bounce"), pct(r, "complaint"),
          pct(r, "unsubscribe"), r["queued"] + r["deferred"], r["held"], guard_text(r)]
         for r in rows])


def show_campaign(row: Row) -> None:
    t = row["thresholds"]
    print(f"campaign  {row['campaign']} (account {row['account']})")
    print(f"status    {row['status']}" + (f": {row['reason']}" if row["reason"] else ""))
    if row["since"]:
        print(f"since     {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(row['since']))}"
              f" by {row['by']}")
    print(f"guard     {guard_text(row)}")
    print(f"mail      submitted {row['submitted']}, sent {row['sent']}, delivered "
          f"{row['delivered']}, hard bounces {row['hard_bounces']}, soft bounces "
          f"{row['soft_bounces']}, complaints {row['complaints']}, unsubscribes "
          f"{row['unsubscribes']}")
    judged = "" if row["judged"] else " (not judged yet)"
    print_table(["rule", f"rate{judged}", "threshold"], [
        ["hard bounce (of sent)", pct(row, "hard_bounce"),
         f">= {percent(t['hard_bounce'])}"],
        ["complaint (of delivered)", pct(row, "complaint"), f"> {percent(t['complaint'])}"],
        ["unsubscribe (of delivered)", pct(row, "unsubscribe"),
         f"> {percent(t['unsubscribe'])}"]])
    print(f"judged after {t['min_volume']} sent; in the queue: {row['queued']} queued, "
          f"{row['deferred']} deferred, {row['held']} held")
    show_engagement(row.get("engagement"))


def show_engagement(e: dict[str, Any] | None) -> None:
    """Opens and clicks: unique counts people only; totals split human / machine."""
    if not e:
        return
    print(f"opens     unique {e['unique_opens']} ({percent(e['open_rate'])} of delivered),"
          f" total {e['opens_total']} (human {e['opens_human']}, machine "
          f"{e['opens_machine']})")
    print(f"clicks    unique {e['unique_clicks']} ({percent(e['click_rate'])} of "
          f"delivered, {percent(e['click_to_open'])} of unique opens), total "
          f"{e['clicks_total']} (human {e['clicks_human']}, machine {e['clicks_machine']})")
    if e.get("top_links"):
        print_table(["top links", "human clicks", "machine clicks"], [
            [shown(link["url"], 100), str(link["clicks_human"]), str(link["clicks_machine"])]
            for link in e["top_links"]])


def show_paused(r: Row) -> None:
    print(f"campaign {r['campaign']} of {r['account']} paused; {r['held']} waiting jobs held "
          f"now, due ones as the workers come to them")


def show_resumed(r: Row) -> None:
    guard = ("the guard judges the mail sent from now on" if r["guard"]
             else "automatic pausing is off for it")
    print(f"campaign {r['campaign']} of {r['account']} resumed; {r['released']} held jobs "
          f"released; {guard}")


def show_dropped(r: Row) -> None:
    print(f"campaign {r['campaign']} of {r['account']} dropped: {r['jobs']} jobs, "
          f"{r['recipients']} recipients removed")
