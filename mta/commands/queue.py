"""`mta queue stats|list|show`: the spool of a running engine (through its admin API) or
of a stopped one (read directly); see mta/commands/remote.py for which is used.

`mta queue suspend|bounce|resume|rules`: operators' rules by scope (--domain, --account,
--campaign [ACCOUNT/]NAME, --provider, --source; the last two apply when each message is
dispatched) with a --duration or --expires and a --reason
(mta.queue.rules); through the API, or written to the spool directly (audited and
evented either way)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from mta.commands.common import add_config_arg, config_from, print_table
from mta.commands.remote import CommandError, add_api_args, either
from mta.http.client import AdminClient, segment
from mta.policy.offline import OfflineSession
from mta.queue.jobs import RcptState
from mta.queue.rules import (
    SCOPES,
    RuleError,
    add_rule,
    check_rule,
    lift_rule,
    new_rule,
    parse_duration,
    rules_listing,
)
from mta.queue.schedule import parse_send_at
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
    register_rules(qsub)
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


# --- rules: suspend, bounce, resume by scope ---------------------------------------------------

SCOPE_HELP = {"campaign": " ([ACCOUNT/]NAME)",
              "provider": " (the shaping file's [provider.NAME]; matched at dispatch)",
              "source": " (an egress source; matched when it is chosen)"}


def register_rules(qsub: argparse._SubParsersAction) -> None:
    rules = qsub.add_parser("rules", help="active suspensions and bounces, with their expiry")
    suspend = qsub.add_parser("suspend", help="hold queued and new mail of a scope until "
                                               "the expiry (or a resume)")
    bounce = qsub.add_parser("bounce", help="bounce queued and new mail of a scope (DSNs) "
                                             "until the expiry")
    resume = qsub.add_parser("resume", help="lift a suspension (or, --bounce, a bounce rule)")
    for q in (suspend, bounce, resume):
        scope = q.add_mutually_exclusive_group(required=True)
        for name in SCOPES:
            scope.add_argument(f"--{name}", help=f"the {name}" + SCOPE_HELP.get(name, ""))
    for q in (suspend, bounce):
        when = q.add_mutually_exclusive_group(required=True)
        when.add_argument("--duration", help="how long: 90s, 15m, 2h, 1d")
        when.add_argument("--expires", help="until: RFC 3339 date-time or Unix seconds")
        q.add_argument("--reason", default="", help="why, kept in the audit log")
    resume.add_argument("--bounce", action="store_true", help="lift a bounce rule")
    for q in (rules, suspend, bounce, resume):
        add_config_arg(q)
        q.add_argument("--json", action="store_true", help="print JSON")
        add_api_args(q)
    rules.set_defaults(func=either(lambda a: with_spool(a, rules_listing),
                                   lambda c, a: c.get("queue/rules")["rules"], show_rules))
    for q, action in ((suspend, "suspend"), (bounce, "bounce")):
        q.set_defaults(action=action, func=either(offline_add, online_add, show_result))
    resume.set_defaults(func=either(offline_resume, online_resume, show_result))


def scope_of(args: argparse.Namespace) -> tuple[str, str]:
    for name in SCOPES:
        value = getattr(args, name, None)
        if value is not None:
            return name, value
    raise CommandError("give --domain, --account, --campaign, --provider or --source")


def rule_from(args: argparse.Namespace, by: str) -> Any:
    scope, value = scope_of(args)
    try:
        duration = parse_duration(args.duration) if args.duration else None
        expires = None
        if args.expires:
            expires = parse_send_at(args.expires)
            if expires is None:
                raise RuleError(f"--expires {args.expires!r}: RFC 3339 or Unix seconds")
        return new_rule(args.action, scope, value, duration=duration, expires=expires,
                        reason=args.reason, by=by)
    except RuleError as exc:
        raise CommandError(str(exc)) from None


def offline_add(args: argparse.Namespace) -> dict[str, Any]:
    with OfflineSession(config_from(args), write=True) as s:
        rule = rule_from(args, s.by)
        done = s.write(lambda txn: add_rule(s.spool, txn, rule, time.time()))
        s.emit({"type": "QueueRuleAdded", **rule.as_dict(), **done})
        s.audit(f"queue.{rule.action}", f"{rule.scope}:{rule.value}", expires=rule.expires,
                **({"reason": rule.reason} if rule.reason else {}))
    return {"rule": rule.as_dict(), **done}


def online_add(client: AdminClient, args: argparse.Namespace) -> dict[str, Any]:
    scope, value = scope_of(args)
    body: dict[str, Any] = {"scope": scope, "value": value, "reason": args.reason}
    body |= {"duration": args.duration} if args.duration else {"expires": args.expires}
    return client.post(f"queue/{args.action}", body)


def offline_resume(args: argparse.Namespace) -> dict[str, Any]:
    action = "bounce" if args.bounce else "suspend"
    scope, value = scope_of(args)
    try:
        value = check_rule(action, scope, value)
    except RuleError as exc:
        raise CommandError(str(exc)) from None
    with OfflineSession(config_from(args), write=True) as s:
        done = s.write(lambda txn: lift_rule(s.spool, txn, action, scope, value, time.time()))
        if done is None:
            raise CommandError(f"no {action} rule for {scope} {value!r}")
        s.emit({"type": "QueueRuleLifted", "action": action, "scope": scope, "value": value,
                "released": done["released"]})
        s.audit(f"queue.resume.{action}", f"{scope}:{value}")
    return done


def online_resume(client: AdminClient, args: argparse.Namespace) -> dict[str, Any]:
    scope, value = scope_of(args)
    return client.post("queue/resume", {"scope": scope, "value": value,
                                        "action": "bounce" if args.bounce else "suspend"})


def show_rules(rows: list[dict[str, Any]]) -> None:
    print_table(["action", "scope", "value", "expires", "left (s)", "by", "reason"], [
        [r["action"], r["scope"], r["value"], clock(r["expires"]), r["left"], r["by"],
         r["reason"]] for r in rows])


def show_result(result: dict[str, Any]) -> None:
    rule = result.get("rule", {})
    done = ", ".join(f"{k} {v}" for k, v in result.items() if k != "rule")
    print(f"{rule.get('action')} {rule.get('scope')} {rule.get('value')} until "
          f"{clock(rule.get('expires'))}: {done}")
