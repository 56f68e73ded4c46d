"""`mta admin ...`: operate a running engine through its admin API.

The address is `[http] listen` from the config (or --url), the token `[http]
admin_token` (or --token, or the MTA_ADMIN_TOKEN environment variable). Each
command prints a table, or the API's JSON with --json. The area commands (`mta queue`,
`mta campaign`, `mta hold`, ...) use the same API when the engine runs and the spool
directly when it does not; `mta admin` always uses the API.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from mta.commands import account, campaign, queue, suppression, throttle
from mta.commands.common import add_config_arg, fail, print_json, print_table
from mta.commands.remote import add_api_args, api_address, missing, output
from mta.http.client import AdminClient, ApiError, segment

Run = Callable[[AdminClient, argparse.Namespace], Any]
Show = Callable[[Any], None]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("admin", help="operate a running engine through its admin API")
    asub = p.add_subparsers(dest="admin_command", required=True)
    for name, help_text, add_args, run, show in COMMANDS:
        cmd = asub.add_parser(name, help=help_text)
        add_config_arg(cmd)
        add_api_args(cmd, offline=False)
        cmd.add_argument("--json", action="store_true", help="print the API's JSON")
        add_args(cmd)
        cmd.set_defaults(func=make_runner(run, show))


def make_runner(run: Run, show: Show) -> Callable[[argparse.Namespace], int]:
    def runner(args: argparse.Namespace) -> int:
        try:
            result = run(client_from(args), args)
        except ApiError as exc:
            return fail(str(exc))
        output(args, result, show)
        return 0

    return runner


def client_from(args: argparse.Namespace) -> AdminClient:
    url, token = api_address(args)
    if not token or not url:
        raise ApiError(missing(url, token))
    return AdminClient(url, token)


# --- arguments -----------------------------------------------------------------------------

def no_args(p: argparse.ArgumentParser) -> None:
    pass


def campaign_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("account")
    p.add_argument("campaign")
    p.add_argument("action", nargs="?", choices=["pause", "resume", "drop"])
    p.add_argument("--reason", default="", help="why (pause), kept in the audit log")
    p.add_argument("--no-guard", metavar="REASON", default="",
                   help="resume with automatic pausing off for it, for this reason")


def account_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name")
    p.add_argument("action", nargs="?", choices=["suspend", "resume"])
    p.add_argument("--reason", default="")


def suppression_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("account")
    p.add_argument("action", nargs="?", choices=["add", "remove"])
    p.add_argument("address", nargs="?")
    p.add_argument("--reason", default="operator")


def job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", help="job id as `mta admin held` shows it")


def message_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("id")


# --- calls -----------------------------------------------------------------------------------

def run_campaign(c: AdminClient, args: argparse.Namespace) -> Any:
    path = f"campaigns/{segment(args.account)}/{segment(args.campaign)}"
    if args.action is None:
        return c.get(path)
    body = {"reason": args.reason, "no_guard": args.no_guard}
    return c.post(f"{path}/{args.action}", {k: v for k, v in body.items() if v})


def run_account(c: AdminClient, args: argparse.Namespace) -> Any:
    path = f"accounts/{segment(args.name)}"
    return c.get(path) if args.action is None else c.post(f"{path}/{args.action}",
                                                          {"reason": args.reason})


def run_suppression(c: AdminClient, args: argparse.Namespace) -> Any:
    path = f"suppression/{segment(args.account)}"
    if args.action is None:
        return c.get(path)
    if not args.address:
        raise ApiError(f"suppression {args.action} needs an ADDRESS")
    if args.action == "add":
        return c.post(path, {"address": args.address, "reason": args.reason})
    return c.delete(f"{path}/{segment(args.address)}")


# --- output ------------------------------------------------------------------------------------

def show_status(d: dict[str, Any]) -> None:
    t, q = d["totals"], d["queue"]
    print("received {received:.0f}  delivered {delivered:.0f}  deferred {deferred:.0f}  "
          "bounced {bounced:.0f}  expired {expired:.0f}".format(**t))
    print(f"queue: {q['total']} messages, {q['jobs']} jobs "
          f"({', '.join(f'{k} {v}' for k, v in sorted(q['by_state'].items())) or 'empty'}), "
          f"{q['recipients']} recipients waiting")
    paused = [c for c in d["campaigns"] if c.get("paused")]
    print(f"paused campaigns: {', '.join(c['account'] + '/' + c['campaign'] for c in paused) or 'none'}")
    for c in d["campaigns"]:
        if c.get("guard") is False:
            print(f"no guard: {c['account']}/{c['campaign']}: {c['no_guard']}")


def show_campaigns(d: dict[str, Any]) -> None:
    t = d["thresholds"]
    pct = campaign.percent
    print(f"thresholds: hard bounces {pct(t['hard_bounce'])}, complaints "
          f"{pct(t['complaint'])}, unsubscribes {pct(t['unsubscribe'])}")
    campaign.show_list(d["campaigns"])


def show_throttle(d: dict[str, Any]) -> None:
    throttle.show_status(throttle.annotate(d["rows"]))


def show_suppression(d: dict[str, Any]) -> None:
    if "entries" not in d:
        print_json(d)
        return
    suppression.show_list(d["entries"])


def show_held(rows: list[dict[str, Any]]) -> None:
    print_table(["job", "reason", "account", "campaign", "domain", "recipients"], [
        [r["job"], r["reason"], r["account"], r["campaign"], r.get("domain", ""),
         len(r["recipients"])] for r in rows])


def show_result(result: Any) -> None:
    print_json(result)


COMMANDS: list[tuple[str, str, Callable[[argparse.ArgumentParser], None], Run, Show]] = [
    ("status", "what flows, the queue, paused campaigns", no_args,
     lambda c, a: c.get("dashboard"), show_status),
    ("queue", "queue counts by state", no_args, lambda c, a: c.get("queue"),
     queue.show_stats),
    ("show", "one message with its per-recipient state", message_args,
     lambda c, a: c.get(f"messages/{segment(a.id)}"), queue.show_message),
    ("campaigns", "campaigns and their rates against the thresholds", no_args,
     lambda c, a: c.get("campaigns"), show_campaigns),
    ("campaign", "one campaign; pause, resume or drop it", campaign_args, run_campaign,
     lambda row: campaign.show_list([row])),
    ("throttle", "each destination's throttle state", no_args,
     lambda c, a: c.get("throttle"), show_throttle),
    ("suppression", "an account's suppression list; add or remove an address",
     suppression_args, run_suppression, show_suppression),
    ("held", "mail held for review or by a pause", no_args, lambda c, a: c.get("held"),
     show_held),
    ("release", "release a held job into delivery", job_args,
     lambda c, a: c.post(f"held/{segment(a.job)}/release"), show_result),
    ("reject", "reject (remove) a held job", job_args,
     lambda c, a: c.post(f"held/{segment(a.job)}/reject"), show_result),
    ("accounts", "the accounts", no_args, lambda c, a: c.get("accounts"),
     account.show_list),
    ("account", "one account; suspend or resume it", account_args, run_account,
     lambda row: account.show_list([row])),
]
