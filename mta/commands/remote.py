"""Operator commands that go through a running engine's admin API, or to the spool.

`mta queue|campaign|throttle|suppression|hold|account` commands with an admin API
equivalent take --url and --token (as `mta admin`: the address defaults to `[http]
listen`, the token to $MTA_ADMIN_TOKEN, then `[http] admin_token`). They use the API
when a token is known and the engine's HTTP listener answers; otherwise (no token, or
the connection is refused: the engine is stopped) they read and write the spool
directly, as --offline always does. An explicit --url or --token that cannot be used
is an error, never a silent fallback. Each command has one function per path
returning the same data, and one printer, so tables and --json agree either way.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from mta.commands.common import config_from, fail, print_json
from mta.http.client import AdminClient, ApiError, base_url, segment, unreachable
from mta.policy.operations import PolicyError

Offline = Callable[[argparse.Namespace], Any]
Online = Callable[[AdminClient, argparse.Namespace], Any]
Show = Callable[[Any], None]
Status = Callable[[Any], int]


class CommandError(Exception):
    """A request that cannot be done; str() says why in one line."""


def add_api_args(parser: argparse.ArgumentParser, offline: bool = True) -> None:
    parser.add_argument("--url", help="engine's HTTP address (default: from [http] listen)")
    parser.add_argument("--token", help="admin token (default: $MTA_ADMIN_TOKEN, then "
                                        "[http] admin_token)")
    if offline:
        parser.add_argument("--offline", action="store_true",
                            help="read and write the spool directly, not through the API")


def api_address(args: argparse.Namespace) -> tuple[str, str]:
    """(url, token) from the flags, $MTA_ADMIN_TOKEN and the config; either may be ''
    (no token anywhere; `[http] enabled = false` and no --url)."""
    url, token = args.url, args.token or os.environ.get("MTA_ADMIN_TOKEN", "")
    if url and token:
        return url, token
    cfg = config_from(args)
    if not url and cfg.http.enabled:
        url = base_url(cfg.http.listen)
    return url or "", token or cfg.http.admin_token


def missing(url: str, token: str) -> str:
    if not token:
        return "no admin token: pass --token, set MTA_ADMIN_TOKEN or [http] admin_token"
    return "no admin API address: pass --url ([http] enabled = false in the config)"


def client_for(args: argparse.Namespace) -> AdminClient | None:
    """The admin API client to use, or None for the spool (see the module's text)."""
    explicit = bool(args.url or args.token)
    if getattr(args, "offline", False):
        if explicit:
            raise CommandError("--offline reads the spool: it takes no --url or --token")
        return None
    url, token = api_address(args)
    if not token or not url:
        if explicit:
            raise ApiError(missing(url, token))
        return None
    client = AdminClient(url, token)
    if client.answers():
        return client
    if explicit:
        raise unreachable(url)
    return None


def require_account(client: AdminClient, name: str | None) -> None:
    """ApiError (404, "no account ...") when `name` is given and is no account."""
    if name is not None:
        client.get(f"accounts/{segment(name)}")


def output(args: argparse.Namespace, data: Any, show: Show) -> None:
    if args.json:
        print_json(data)
    else:
        show(data)


def either(offline: Offline, online: Online | None, show: Show, status: Status | None = None
           ) -> Callable[[argparse.Namespace], int]:
    """A command's `func`: fetch through the API or the spool, then print. Without
    `online` (no API equivalent) always the spool."""

    def run(args: argparse.Namespace) -> int:
        try:
            client = None if online is None else client_for(args)
            data = offline(args) if client is None or online is None else online(client, args)
        except (ApiError, CommandError, FileNotFoundError, PolicyError) as exc:
            return fail(str(exc))
        output(args, data, show)
        return status(data) if status is not None else 0

    return run
