"""`mta node drain --to HOST:PORT`: hand this node's queued mail to another node
(mta.queue.drain). Works on the spool directly, the engine running or not; run it
again after an interruption: it resumes where it was. Held mail is drained too and keeps
its hold there (with an operator's suspension, the rule goes along)."""

from __future__ import annotations

import argparse
import smtplib

from mta.commands.common import add_config_arg, config_from, fail, print_json
from mta.config import parse_hostport
from mta.policy.offline import OfflineSession
from mta.queue.drain import Drain, DrainDeferred, smtp_sender


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("node", help="this node in a cluster")
    nsub = p.add_subparsers(dest="node_command", required=True)
    drain = nsub.add_parser("drain", help="hand the queued mail to another node over SMTP")
    drain.add_argument("--to", required=True, help="HOST:PORT of the other node's SMTP")
    drain.add_argument("--json", action="store_true", help="print JSON")
    add_config_arg(drain)
    drain.set_defaults(func=run_drain)


def run_drain(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    try:
        host, port = parse_hostport(args.to)
    except ValueError as exc:
        return fail(f"--to {args.to!r}: {exc}")
    send, close = smtp_sender(host, port, cfg.engine.hostname)
    try:
        with OfflineSession(cfg, write=True) as s:
            s.audit("node.drain", args.to)
            drain = Drain(s.spool, send, cfg.engine.hostname)
            try:
                report = drain.run()
            except (smtplib.SMTPException, OSError, DrainDeferred) as exc:
                done = drain.report
                s.emit({"type": "NodeDrain", "to": args.to, "result": f"stopped: {exc}",
                        "messages": done.sent, "recipients": done.recipients})
                return fail(f"drain to {args.to} stopped after {done.sent} messages "
                            f"({done.recipients} recipients): {exc}; the rest is kept here: "
                            f"run it again to resume")
            s.emit({"type": "NodeDrain", "to": args.to, "result": "done",
                    "messages": report.sent, "refused": len(report.refused)})
    except FileNotFoundError as exc:
        return fail(str(exc))
    finally:
        close()
    result = {"to": args.to, "messages": report.sent, "recipients": report.recipients,
              "held": report.held, "refused": report.refused, "kept": report.kept}
    if args.json:
        print_json(result)
    else:
        print(f"drained {report.sent} messages ({report.recipients} recipients, "
              f"{report.held} of them held: they keep their hold there) to {args.to}"
              + (f"; {report.kept} recipients refused there, kept here" if report.kept else ""))
    return 1 if report.refused else 0
