"""`mta tls check DOMAIN` and `mta tls report`: the outbound TLS policy, shown and used.

`check` looks up what the engine would (MX, DANE, MTA-STS, TLS-RPT; the MTA-STS policy
the spool keeps, else fetched without keeping it) and prints, per MX host, what TLS it
must offer and why; `--connect` also opens a session to each usable address (EHLO,
STARTTLS, QUIT: no mail) and shows the verdict. `report` builds the TLS reports of a
day from the counts in the spool and sends them (`--dry-run`: prints them only).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from typing import Any

from mta.commands.common import add_config_arg, config_from, fail, print_json
from mta.config import Config
from mta.delivery.connection import ConnectSettings, Target, TlsRoute, connect
from mta.delivery.mx import RouteError
from mta.delivery.service import make_resolver
from mta.delivery.tls.policy import refusal
from mta.delivery.tls.report import day_of
from mta.delivery.tls.reporter import TlsReporter
from mta.delivery.tls.service import build_tls
from mta.delivery.tls.store import TlsStore
from mta.queue.spool import Spool


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tls", help="outbound TLS: what applies to a domain, TLS reports")
    tsub = p.add_subparsers(dest="tls_command", required=True)
    check = tsub.add_parser("check", help="what TLS the engine would use for a domain, and why")
    check.add_argument("domain")
    check.add_argument("--connect", action="store_true",
                       help="also open a session to each usable MX address (no mail)")
    check.add_argument("--json", action="store_true", help="print JSON")
    report = tsub.add_parser("report", help="build and send the TLS reports of a day (UTC)")
    report.add_argument("--day", default="yesterday",
                        help="YYYY-MM-DD, today or yesterday (default), or 'due': every "
                             "finished day not yet reported")
    report.add_argument("--dry-run", action="store_true", help="print the reports, send nothing")
    report.add_argument("--json", action="store_true", help="print JSON")
    for q in (check, report):
        add_config_arg(q)
    check.set_defaults(func=run_check)
    report.set_defaults(func=run_report)


# --- check ------------------------------------------------------------------------------


def run_check(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    domain = args.domain.strip().rstrip(".").lower()
    if not domain:
        return fail("no domain given")
    spool = _open_spool(cfg, readonly=True)
    try:
        found = asyncio.run(_check(cfg, domain, spool, args.connect))
    finally:
        if spool is not None:
            spool.close()
    if args.json:
        print_json(found)
    else:
        _show(found)
    return 0 if found.get("route") else 1


async def _check(cfg: Config, domain: str, spool: Spool | None, probe: bool) -> dict[str, Any]:
    resolver = make_resolver(cfg)
    route = await resolver.route(domain)
    if isinstance(route, RouteError):
        return {"domain": domain, "route": None,
                "error": f"{route.status} {route.text}"}
    parts = build_tls(cfg, resolver.lookup, TlsStore(spool) if spool else None, None)
    try:
        hosts = [h.name for h in route.hosts]
        plan = await parts.policies.build(domain, hosts, route.secure)
        configured = parts.policies.explicit.get(domain, parts.policies.default_mode)
        out: dict[str, Any] = {
            "domain": domain, "mode": configured.value,
            "mx_authenticated": route.secure, "notes": list(plan.notes),
            "route": [{"host": h.name, "addresses": list(h.addresses)} for h in route.hosts],
            "hosts": {}, "excluded": [{"host": e.host, "policy": e.policy, "reason": e.reason,
                                       "status": e.status} for e in plan.excluded],
        }
        for host in route.hosts:
            policy = plan.host(host.name)
            if policy is not None:
                out["hosts"][host.name] = {"policy": policy.policy, "mode": policy.mode,
                                           "require_tls": policy.require_tls,
                                           "check": policy.check.value,
                                           "describe": policy.describe()}
        stop = refusal(plan)
        out["verdict"] = (f"defer ({stop.status}): {stop.reason}" if stop is not None
                          else "deliver to " + ", ".join(h for h, _ in plan.hosts))
        if probe and stop is None:
            out["sessions"] = await _probe(cfg, route, plan, parts.checker)
        return out
    finally:
        await parts.https.close()


async def _probe(cfg: Config, route: Any, plan: Any, checker: Any) -> list[dict[str, Any]]:
    d = cfg.delivery
    settings = ConnectSettings(port=d.port, helo=d.helo_name or cfg.engine.hostname,
                               connect_timeout=min(d.connect_timeout, 15.0),
                               command_timeout=min(d.command_timeout, 15.0),
                               source_address=d.source_address, tls=TlsRoute(plan, checker))
    sessions = []
    for host in route.hosts:
        if not plan.allows(host.name):
            continue
        for address in host.addresses:
            conn, failures = await connect([Target(host.name, address)], settings)
            if conn is not None:
                sessions.append({"host": host.name, "address": address, "result": "ok",
                                 **(conn.tls_fields or {})})
                await conn.close()
            else:
                failure = failures[-1]
                sessions.append({"host": host.name, "address": address,
                                 "result": f"{failure.enhanced} {failure.text}",
                                 **(failure.tls or {})})
    return sessions


def _show(found: dict[str, Any]) -> None:
    print(f"domain: {found['domain']}")
    if not found.get("route"):
        print(f"no route: {found.get('error')}")
        return
    print(f"configured mode: {found['mode']}")
    print(f"MX answer DNSSEC-authenticated: {'yes' if found['mx_authenticated'] else 'no'}")
    for note in found["notes"]:
        print(f"  - {note}")
    print("MX hosts:")
    for entry in found["route"]:
        host = entry["host"]
        policy = found["hosts"].get(host)
        what = policy["describe"] if policy else "excluded"
        print(f"  {host} [{', '.join(entry['addresses'])}]: {what}")
    for excluded in found["excluded"]:
        print(f"  excluded {excluded['host']} ({excluded['policy']}): {excluded['reason']}")
    print(f"the engine would: {found['verdict']}")
    for session in found.get("sessions", []):
        tls = (f"{session.get('tls_version')} {session.get('tls_cipher')}, verified: "
               f"{session.get('tls_verified')}" if session.get("tls") else "no TLS")
        error = f" ({session['tls_error']})" if session.get("tls_error") else ""
        print(f"  session {session['host']} [{session['address']}]: {session['result']}; "
              f"{tls}; policy {session.get('tls_policy')}{error}")


# --- report -----------------------------------------------------------------------------


def run_report(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    spool = _open_spool(cfg, readonly=False)
    if spool is None:
        return fail(f"no spool at {cfg.spool.path}")
    try:
        results = asyncio.run(_report(cfg, spool, args.day, args.dry_run))
    finally:
        spool.close()
    if args.json:
        print_json([{"day": r.day, "domain": r.domain, "rua": list(r.rua), "sent": r.sent,
                     "report": r.report} for r in results])
        return 0
    if not results:
        print("no sessions counted for that day")
    for r in results:
        summary = ", ".join(
            f"{p['policy']['policy-type']}: {p['summary']['total-successful-session-count']} ok"
            f" / {p['summary']['total-failure-session-count']} failed"
            for p in r.report["policies"])
        print(f"{r.day} {r.domain}: {summary}")
        if args.dry_run:
            print(json.dumps(r.report, indent=2))
        elif not r.rua:
            print("  no _smtp._tls rua record: not sent, counts dropped")
        for uri, why in r.sent.items():
            print(f"  {uri}: {why or 'sent'}")
    return 0


async def _report(cfg: Config, spool: Spool, day: str, dry_run: bool) -> list[Any]:
    resolver = make_resolver(cfg)
    store = TlsStore(spool)

    async def submit(op: Any) -> Any:
        [result] = spool.apply([op])
        if isinstance(result, BaseException):
            raise result
        return result

    parts = build_tls(cfg, resolver.lookup, store, submit)
    reporter = TlsReporter(cfg, store, resolver.lookup, parts.https, submit)
    try:
        if day == "due":
            return await reporter.send_due() if not dry_run else [
                r for d in reporter.finished_days() for r in await reporter.send_day(d, True)]
        return await reporter.send_day(_day(day), dry_run)
    finally:
        await parts.https.close()


def _day(text: str) -> str:
    now = time.time()
    if text == "today":
        return day_of(now)
    if text == "yesterday":
        return day_of(now - 86_400)
    time.strptime(text, "%Y-%m-%d")  # ValueError for anything else
    return text


def _open_spool(cfg: Config, readonly: bool) -> Spool | None:
    with contextlib.suppress(FileNotFoundError, OSError):
        return Spool(cfg.spool.path, cfg.spool.map_size, readonly=readonly)
    return None
