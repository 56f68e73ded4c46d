"""The HTTP routes: /metrics, the admin API under /api/v1/, the dashboard, unsubscribe.

- ``/metrics`` and ``/healthz`` are open (the listener is on loopback by default; put
  it behind your network's access control otherwise).
- ``/api/v1/*`` needs ``Authorization: Bearer <token>``: 401 without a valid token, 429
  after `[http] max_auth_failures` bad tokens from one address within the window,
  403 when no token is configured (the admin API is then off). Every request is
  audited (who, from where, what, the status); every action also as an action record.
- ``/`` is the dashboard: static HTML and JS with no data in them; the page asks the
  operator for a token once and keeps it in the tab's sessionStorage (gone when the
  tab closes, never in a cookie, so no CSRF; never in a URL, so never in a log).
- ``/unsubscribe/{token}`` (`[policy] unsubscribe_path`): RFC 8058 one-click (POST);
  GET shows a confirmation page with a button that POSTs.
- ``/c/{token}`` and ``/o/{token}.gif`` (`[tracking]`): click and open tracking, public
  (mta/http/tracking.py).
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from mta.audit import AuditLog, access_record, auth_record
from mta.http.api import AdminApi
from mta.http.auth import FailureLimiter, TokenChecker
from mta.http.operations import InvalidToken, NotFound, PolicyUnavailable
from mta.metrics import render
from mta.outbox import status as outbox_status
from mta.outbox.status import UnknownSink
from mta.queue.rules import new_rule, parse_duration
from mta.queue.schedule import parse_send_at

STATIC = Path(__file__).parent / "static"
MAX_LIMIT = 10_000
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class HttpState:
    admin: AdminApi
    checker: TokenChecker
    limiter: FailureLimiter
    audit: AuditLog | None
    metrics_registry: Any
    tracker: Any = None  # mta.tracking.hits.Tracker: the public /c/ and /o/ endpoints


STATE = web.AppKey("state", HttpState)
# (client address, operator) of an authenticated API request; RequestKey since aiohttp 3.12.
WHO: Any = web.RequestKey("who", tuple) if hasattr(web, "RequestKey") else "who"


def state(request: web.Request) -> HttpState:
    return request.app[STATE]


def as_json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status,
                             dumps=functools.partial(json.dumps, default=str))


def json_error(status: int, message: str, headers: dict[str, str] | None = None
               ) -> web.Response:
    response = as_json({"error": message}, status)
    if headers:
        response.headers.update(headers)
    return response


# --- middlewares -----------------------------------------------------------------------

@web.middleware
async def page_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    for name, value in PAGE_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


@web.middleware
async def api_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith("/api/"):
        return await handler(request)
    st = state(request)
    client = request.remote or ""
    if not st.checker.enabled:
        return json_error(403, "the admin API is disabled: set [http] admin_token")
    wait = math.ceil(st.limiter.retry_after(client))
    if wait:
        record(st, auth_record("admin-api", client, "", "refused"))
        return json_error(429, f"too many failed authentications from {client}: try again "
                               f"in {wait} s", {"Retry-After": str(wait)})
    identity = st.checker.identify(request.headers.get("Authorization"))
    if identity is None:
        st.limiter.failed(client)
        record(st, auth_record("admin-api", client, "", "failed"))
        return json_error(401, "a valid bearer token is required",
                          {"WWW-Authenticate": 'Bearer realm="mta"'})
    request[WHO] = (client, identity)
    response = await api_errors(request, handler)
    record(st, access_record(client, identity, request.method, request.path_qs,
                             response.status))
    return response


async def api_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Known failures as JSON errors with the right status."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        return json_error(exc.status, exc.reason)
    except NotFound as exc:
        return json_error(404, str(exc))
    except PolicyUnavailable as exc:
        return json_error(501, str(exc))
    except ValueError as exc:
        return json_error(400, str(exc))


def record(st: HttpState, entry: dict[str, Any]) -> None:
    if st.audit is not None:
        st.audit.record(entry)


# --- helpers ---------------------------------------------------------------------------

def limit_arg(request: web.Request, default: int = 100) -> int:
    raw = request.query.get("limit", str(default))
    if not raw.isdigit() or not 0 < int(raw) <= MAX_LIMIT:
        raise ValueError(f"limit must be an integer from 1 to {MAX_LIMIT}")
    return int(raw)


async def body_fields(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        data = await request.json()
    except ValueError:
        raise ValueError("the request body must be a JSON object") from None
    except RecursionError:  # a hostile body nested thousands deep
        raise ValueError("the request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError("the request body must be a JSON object")
    return data


async def act(request: web.Request, action: str, obj: str,
              run: Callable[[], Awaitable[Any]], **details: Any) -> web.Response:
    return as_json(await state(request).admin.act(request[WHO], action, obj, run, **details))


# --- reads -------------------------------------------------------------------------------

async def get_queue(request: web.Request) -> web.Response:
    return as_json(await state(request).admin.queue())


async def get_messages(request: web.Request) -> web.Response:
    return as_json(await state(request).admin.messages(limit_arg(request)))


async def get_message(request: web.Request) -> web.Response:
    message_id = request.match_info["id"]
    found = await state(request).admin.message(message_id)
    if found is None:
        raise NotFound(f"no message {message_id!r} in the spool")
    return as_json(found)


async def get_campaigns(request: web.Request) -> web.Response:
    return as_json(await state(request).admin.campaigns())


async def get_campaign(request: web.Request) -> web.Response:
    account, campaign = request.match_info["account"], request.match_info["campaign"]
    policy = state(request).admin.policy
    return as_json(await policy.campaign(account, campaign) | {
        "thresholds": policy.thresholds()})


async def get_throttle(request: web.Request) -> web.Response:
    return as_json({"rows": await state(request).admin.throttle()})


async def get_egress(request: web.Request) -> web.Response:
    return as_json(await state(request).admin.egress())


async def get_suppression(request: web.Request) -> web.Response:
    account = request.match_info["account"]
    rows = await state(request).admin.policy.suppressions(account, limit_arg(request, 1000))
    return as_json({"account": account, "entries": rows})


async def get_held(request: web.Request) -> web.Response:
    return as_json(await state(request).admin.policy.held(limit_arg(request)))


async def get_accounts(request: web.Request) -> web.Response:
    admin = state(request).admin
    return as_json([admin.with_wait(row) for row in await admin.policy.accounts()])


async def get_account(request: web.Request) -> web.Response:
    admin = state(request).admin
    return as_json(admin.with_wait(await admin.policy.account(request.match_info["name"])))


async def get_dashboard(request: web.Request) -> web.Response:
    return as_json(await state(request).admin.dashboard())


async def get_webhooks(request: web.Request) -> web.Response:
    return as_json(await state(request).admin.webhooks())


async def get_webhook_dead(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    try:
        rows = await state(request).admin.webhook_dead(name, limit_arg(request, 1000))
    except UnknownSink as exc:
        raise NotFound(str(exc)) from None
    return as_json({"sink": name, "dead": rows})


async def webhook_replay(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    admin = state(request).admin
    try:
        outbox_status.require_sink(admin.cfg, name)
    except UnknownSink as exc:
        raise NotFound(str(exc)) from None
    return await act(request, "webhook.replay", name, lambda: admin.webhook_replay(name))


# --- actions -----------------------------------------------------------------------------

async def campaign_action(request: web.Request) -> web.Response:
    account, campaign = request.match_info["account"], request.match_info["campaign"]
    action = request.match_info["action"]
    policy = state(request).admin.policy
    fields = await body_fields(request)
    reason = str(fields.get("reason", ""))[:200]
    no_guard = no_guard_field(fields)
    runs = {"pause": lambda: policy.pause_campaign(account, campaign, reason),
            "resume": lambda: policy.resume_campaign(account, campaign, no_guard),
            "drop": lambda: policy.drop_campaign(account, campaign)}
    details = {"reason": reason, "no_guard": no_guard if action == "resume" else ""}
    return await act(request, f"campaign.{action}", f"{account}/{campaign}", runs[action],
                     **{k: v for k, v in details.items() if v})


def no_guard_field(fields: dict[str, Any]) -> str:
    """A resume's `no_guard`: the operator's reason to turn automatic pausing off."""
    value = fields.get("no_guard", "")
    if not isinstance(value, str) or (value and not value.strip()):
        raise ValueError("no_guard must be the reason (text) to turn automatic pausing off")
    return value.strip()[:200]


async def campaign_rate(request: web.Request) -> web.Response:
    """POST /api/v1/campaigns/{account}/{campaign}/rate {"max_rate": "100/m"} ("": none)."""
    account, campaign = request.match_info["account"], request.match_info["campaign"]
    value = (await body_fields(request)).get("max_rate", "")
    if not isinstance(value, str):
        raise ValueError('max_rate: a rate like "100/m", or "" for none')
    admin = state(request).admin
    return await act(request, "campaign.rate", f"{account}/{campaign}",
                     lambda: admin.set_campaign_rate(account, campaign, value.strip()),
                     max_rate=value.strip()[:40])


async def get_queue_rules(request: web.Request) -> web.Response:
    return as_json({"rules": await state(request).admin.queue_rules()})


async def queue_rule_action(request: web.Request) -> web.Response:
    """POST /api/v1/queue/{suspend|bounce|resume} {"scope", "value", "duration" or
    "expires", "reason"}; resume lifts a suspension (or, with "action": "bounce", a
    bounce rule)."""
    action = request.match_info["action"]
    admin = state(request).admin
    fields = await body_fields(request)
    scope, value = str(fields.get("scope", "")), str(fields.get("value", ""))
    obj = f"{scope}:{value}"[:300]
    if action == "resume":
        lifted = str(fields.get("action", "suspend"))
        return await act(request, f"queue.resume.{lifted}"[:40], obj,
                         lambda: admin.lift_queue_rule(lifted, scope, value))
    rule = new_rule(action, scope, value, duration=duration_field(fields),
                    expires=expires_field(fields), reason=str(fields.get("reason", "")),
                    by=request[WHO][1])
    return await act(request, f"queue.{action}", obj, lambda: admin.add_queue_rule(rule),
                     expires=rule.expires, **({"reason": rule.reason} if rule.reason else {}))


def duration_field(fields: dict[str, Any]) -> float | None:
    value = fields.get("duration")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError("duration: seconds, or text like 15m, 2h, 1d")
    return parse_duration(str(value))


def expires_field(fields: dict[str, Any]) -> float | None:
    value = fields.get("expires")
    if value is None:
        return None
    when = parse_send_at(str(value)) if not isinstance(value, bool) else None
    if when is None:
        raise ValueError("expires: an RFC 3339 date-time or Unix seconds")
    return when


async def account_action(request: web.Request) -> web.Response:
    name, action = request.match_info["name"], request.match_info["action"]
    policy = state(request).admin.policy
    reason = str((await body_fields(request)).get("reason", ""))[:200]
    runs = {"suspend": lambda: policy.suspend_account(name, reason),
            "resume": lambda: policy.resume_account(name)}
    return await act(request, f"account.{action}", name, runs[action])


async def add_suppression(request: web.Request) -> web.Response:
    account = request.match_info["account"]
    fields = await body_fields(request)
    address = str(fields.get("address", "")).strip()
    if "@" not in address:
        raise ValueError("give the address to suppress: {\"address\": \"user@example.com\"}")
    reason = str(fields.get("reason", "operator"))[:200]
    policy = state(request).admin.policy
    return await act(request, "suppression.add", f"{account}/{address}",
                     lambda: policy.suppress(account, address, reason))


async def remove_suppression(request: web.Request) -> web.Response:
    account, address = request.match_info["account"], request.match_info["address"]
    policy = state(request).admin.policy
    return await act(request, "suppression.remove", f"{account}/{address}",
                     lambda: policy.unsuppress(account, address))


async def held_action(request: web.Request) -> web.Response:
    job, action = request.match_info["job"], request.match_info["action"]
    policy = state(request).admin.policy
    runs = {"release": lambda: policy.release_held(job),
            "reject": lambda: policy.reject_held(job)}
    return await act(request, f"held.{action}", job, runs[action])


# --- open routes ---------------------------------------------------------------------------

async def get_metrics(request: web.Request) -> web.Response:
    st = state(request)
    await st.admin.refresh_for_scrape()
    body = await asyncio.to_thread(render, st.metrics_registry, [st.admin.collector()])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def get_health(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def get_index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html")


UNSUBSCRIBE_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Unsubscribe</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body><h1>{title}</h1><p>{text}</p>{form}</body></html>
"""
UNSUBSCRIBE_FORM = ('<form method="post"><input type="hidden" name="List-Unsubscribe" '
                    'value="One-Click"><button type="submit">Unsubscribe</button></form>')


def unsubscribe_page(status: int, title: str, text: str, form: bool = False) -> web.Response:
    html = UNSUBSCRIBE_PAGE.format(title=title, text=text, form=UNSUBSCRIBE_FORM if form else "")
    return web.Response(text=html, status=status, content_type="text/html")


async def get_unsubscribe(request: web.Request) -> web.Response:
    """A person clicked the link: confirm first (GETs come from link scanners too)."""
    return unsubscribe_page(200, "Unsubscribe", "Stop receiving these e-mails?", form=True)


async def post_unsubscribe(request: web.Request) -> web.Response:
    """RFC 8058 one-click: the mailbox provider POSTs List-Unsubscribe=One-Click here."""
    policy = state(request).admin.policy
    try:
        await policy.unsubscribe(request.match_info["token"])
    except InvalidToken:
        return unsubscribe_page(400, "Link not valid", "This unsubscribe link is not valid.")
    except PolicyUnavailable:
        return unsubscribe_page(503, "Try again later",
                                "Unsubscribing is not available now; please try again later.")
    return unsubscribe_page(200, "Unsubscribed", "You will not receive these e-mails again.")


# --- the application -----------------------------------------------------------------------

API = "/api/v1"


def unsubscribe_path(cfg: Any) -> str:
    """Where one-click links point: `[policy] unsubscribe_path` (default /unsubscribe/)."""
    path = getattr(getattr(cfg, "policy", None), "unsubscribe_path", "/unsubscribe/")
    return "/" + path.strip("/")


def add_routes(app: web.Application, cfg: Any) -> None:
    r = app.router
    r.add_get("/", get_index)
    r.add_static("/static/", STATIC, show_index=False, follow_symlinks=False)
    r.add_get("/metrics", get_metrics)
    r.add_get("/healthz", get_health)
    r.add_get(unsubscribe_path(cfg) + "/{token}", get_unsubscribe)
    r.add_post(unsubscribe_path(cfg) + "/{token}", post_unsubscribe)
    r.add_get(f"{API}/dashboard", get_dashboard)
    r.add_get(f"{API}/queue", get_queue)
    r.add_get(f"{API}/queue/rules", get_queue_rules)
    r.add_post(f"{API}/campaigns/{{account}}/{{campaign}}/rate", campaign_rate)
    r.add_post(f"{API}/queue/{{action:suspend|bounce|resume}}", queue_rule_action)
    r.add_get(f"{API}/messages", get_messages)
    r.add_get(f"{API}/messages/{{id}}", get_message)
    r.add_get(f"{API}/campaigns", get_campaigns)
    r.add_get(f"{API}/campaigns/{{account}}/{{campaign}}", get_campaign)
    r.add_post(f"{API}/campaigns/{{account}}/{{campaign}}/{{action:pause|resume|drop}}",
               campaign_action)
    r.add_get(f"{API}/throttle", get_throttle)
    r.add_get(f"{API}/egress", get_egress)
    r.add_get(f"{API}/suppression/{{account}}", get_suppression)
    r.add_post(f"{API}/suppression/{{account}}", add_suppression)
    r.add_delete(f"{API}/suppression/{{account}}/{{address}}", remove_suppression)
    r.add_get(f"{API}/held", get_held)
    r.add_post(f"{API}/held/{{job}}/{{action:release|reject}}", held_action)
    r.add_get(f"{API}/accounts", get_accounts)
    r.add_get(f"{API}/webhooks", get_webhooks)
    r.add_get(f"{API}/webhooks/{{name}}/dead", get_webhook_dead)
    r.add_post(f"{API}/webhooks/{{name}}/replay", webhook_replay)
    r.add_get(f"{API}/accounts/{{name}}", get_account)
    r.add_post(f"{API}/accounts/{{name}}/{{action:suspend|resume}}", account_action)


def build_app(st: HttpState) -> web.Application:
    app = web.Application(middlewares=[page_headers, api_guard], client_max_size=1024**2)
    app[STATE] = st
    add_routes(app, st.admin.cfg)
    if st.tracker is not None:  # public like /unsubscribe: api_guard only guards /api/
        from mta.http.tracking import add_tracking_routes

        tc = st.admin.cfg.tracking
        add_tracking_routes(app, st.tracker, tc.click_path, tc.open_path)
    return app
