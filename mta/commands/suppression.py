"""`mta suppression list|add|remove|import|export ACCOUNT ...`: an account's opt-outs.

Hard bounces, complaints and unsubscribes are added by the engine itself; RCPT to a
listed address is refused with 550 5.7.1. CSV columns: address, reason, campaign,
created, detail (import: a header row is optional; without one, address[,reason]).
`list`, `add` and `remove` go through a running engine's admin API, or to the spool
directly (see mta/commands/remote.py); `import` and `export` always use the spool.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mta.commands.common import add_config_arg, config_from, fail, print_table
from mta.commands.remote import CommandError, add_api_args, either
from mta.http.client import MAX_LIMIT, AdminClient, ApiError, segment
from mta.policy import operations
from mta.policy.offline import OfflineSession
from mta.policy.operations import PolicyError

Row = dict[str, Any]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("suppression", help="an account's suppression list")
    ssub = p.add_subparsers(dest="suppression_command", required=True)
    parsers = {name: ssub.add_parser(name, help=text) for name, text in (
        ("list", "the listed addresses"), ("add", "list addresses"),
        ("remove", "take addresses off the list"),
        ("import", "list every address of a CSV file ('-': stdin)"),
        ("export", "the list as CSV (to a file, or stdout)"))}
    for q in parsers.values():
        q.add_argument("account", help="the account whose list it is")
        add_config_arg(q)
        q.add_argument("--json", action="store_true", help="print JSON")
    listing, add, remove = parsers["list"], parsers["add"], parsers["remove"]
    listing.add_argument("--limit", type=int, default=None)
    add.add_argument("addresses", nargs="+")
    add.add_argument("--reason", default="manual")
    remove.add_argument("addresses", nargs="+")
    parsers["import"].add_argument("file")
    parsers["export"].add_argument("file", nargs="?", default="-")
    for q in (listing, add, remove):
        add_api_args(q)
    listing.set_defaults(func=either(offline_list, online_list, show_list))
    add.set_defaults(func=either(offline_add, online_add, show_change, change_status))
    remove.set_defaults(func=either(offline_remove, online_remove, show_change, change_status))
    parsers["import"].set_defaults(func=either(offline_import, None, show_change, change_status))
    parsers["export"].set_defaults(func=run_export)


def _rows(args: argparse.Namespace, limit: int | None) -> list[dict[str, Any]]:
    with OfflineSession(config_from(args)) as s:
        def rows(txn: Any) -> list[dict[str, Any]]:
            s.require_account(txn, args.account)
            return operations.suppression_rows(s.store, txn, args.account, limit)

        return s.read(rows)


def offline_list(args: argparse.Namespace) -> list[Row]:
    return _rows(args, args.limit)


def online_list(client: AdminClient, args: argparse.Namespace) -> list[Row]:
    path = f"suppression/{segment(args.account)}?limit={args.limit or MAX_LIMIT}"
    return client.get(path)["entries"]


def show_list(rows: list[Row]) -> None:
    print_table(["address", "reason", "campaign", "created"],
                [[r["address"], r["reason"], r["campaign"], r["created"]] for r in rows])


def run_export(args: argparse.Namespace) -> int:
    try:
        rows = _rows(args, None)
    except (FileNotFoundError, PolicyError) as exc:
        return fail(str(exc))
    text = operations.export_csv(rows)
    if args.file == "-":
        sys.stdout.write(text)
    else:
        with open(args.file, "w", encoding="utf-8", newline="") as out:
            out.write(text)
        print(f"{len(rows)} addresses written to {args.file}", file=sys.stderr)
    return 0


def _write(args: argparse.Namespace, action: str, fn: Any) -> Row:
    with OfflineSession(config_from(args), write=True) as s:
        def change(txn: Any) -> Row:
            s.require_account(txn, args.account)
            return fn(s, txn)

        result = s.write(change)
        s.audit(f"suppression.{action}", args.account, **{
            k: v for k, v in result.items() if k != "account"})
    return result


def show_change(result: Row) -> None:
    print(", ".join(f"{k} {len(v) if isinstance(v, list) else v}"
                    for k, v in result.items() if k != "account"))


def change_status(result: Row) -> int:
    return 0 if not result.get("invalid") else 1


def offline_add(args: argparse.Namespace) -> Row:
    rows = [(a, args.reason, "", "") for a in args.addresses]
    return _write(args, "add", lambda s, txn: operations.import_suppressions(
        s.store, txn, args.account, rows, s.now()))


def online_add(client: AdminClient, args: argparse.Namespace) -> Row:
    """One POST an address; the counts as `operations.import_suppressions` gives them."""
    result: Row = {"account": args.account, "added": 0, "existing": 0, "invalid": []}
    for address in args.addresses:
        try:
            reply = client.post(f"suppression/{segment(args.account)}",
                                {"address": address, "reason": args.reason})
        except ApiError as exc:
            if exc.status != 400:
                raise
            result["invalid"].append(address)
            continue
        result["added" if reply["added"] else "existing"] += 1
    return result


def offline_remove(args: argparse.Namespace) -> Row:
    def remove(s: OfflineSession, txn: Any) -> Row:
        gone = [a for a in args.addresses
                if operations.remove_suppression(s.store, txn, args.account, a)]
        return {"account": args.account, "removed": len(gone),
                "not_listed": [a for a in args.addresses if a not in gone]}

    return _write(args, "remove", remove)


def online_remove(client: AdminClient, args: argparse.Namespace) -> Row:
    result: Row = {"account": args.account, "removed": 0, "not_listed": []}
    for address in args.addresses:
        try:
            client.delete(f"suppression/{segment(args.account)}/{segment(address)}")
        except ApiError as exc:
            if exc.status != 404:
                raise
            result["not_listed"].append(address)
            continue
        result["removed"] += 1
    return result


def offline_import(args: argparse.Namespace) -> Row:
    try:
        if args.file == "-":
            text = sys.stdin.read()
        else:
            with open(args.file, encoding="utf-8-sig", newline="") as src:
                text = src.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"cannot read {args.file}: {exc}") from None
    rows = operations.parse_csv(text)
    return _write(args, "import", lambda s, txn: operations.import_suppressions(
        s.store, txn, args.account, rows, s.now()))
