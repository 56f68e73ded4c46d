"""The injection API's listener: `POST /api/inject/v1` at `[inject] listen`.

Every worker serves it on the same address (SO_REUSEPORT, as the SMTP listener), so
injected mail is rendered and stored on every core, and the address is apart from the
operators' listener (worker 0 only, the admin API and dashboard): apps get this port
and nothing else. mta/engine.py calls `check_inject(cfg)` among the startup checks and
`start_inject(ctx, intake)` in each worker, with the worker's own `Intake`: injected
mail goes through the same checks and the same store as SMTP mail.

Authentication is per account (`mta.inject.auth`); failures count against the client's
address with SMTP AUTH's engine-wide limit (`[smtp] max_auth_failures`: then 429), and
every attempt goes to the audit log (channel "inject").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from aiohttp import web

from mta.config import Config, StartupError, check_bindable, parse_hostport
from mta.context import WorkerContext
from mta.inject.auth import ApiKeys, parse_authorization
from mta.inject.build import Settings
from mta.inject.request import BadRequest, Limits
from mta.inject.service import Injector
from mta.smtp.intake import Intake
from mta.smtp.session import Client

log = logging.getLogger("mta.inject")

ROUTE = "/api/inject/v1"
CHANNEL = "inject"
CHALLENGE = {"WWW-Authenticate": 'Basic realm="mta inject", charset="UTF-8"'}
TOO_MANY = ("too many failed authentications from your address ([smtp] max_auth_failures); "
            "try again later")


@dataclass
class InjectState:
    injector: Injector
    intake: Intake
    keys: ApiKeys
    max_request_size: int


STATE = web.AppKey("inject", InjectState)


def check_inject(cfg: Config) -> None:
    """A startup check: the injection address can be bound."""
    if cfg.inject.listen:
        check_bindable("[inject] listen", cfg.inject.listen)


def make_injector(cfg: Config, intake: Intake) -> Injector:
    return Injector(intake,
                    Limits(cfg.inject.max_recipients, cfg.smtp.max_message_size),
                    Settings(cfg.smtp.campaign_header, cfg.engine.hostname,
                             cfg.smtp.max_message_size, cfg.inject.max_total_size,
                             cfg.tracking.header))


def build_inject_app(cfg: Config, intake: Intake) -> web.Application:
    app = web.Application(client_max_size=cfg.inject.max_request_size)
    app[STATE] = InjectState(make_injector(cfg, intake), intake, ApiKeys(cfg.accounts),
                             cfg.inject.max_request_size)
    app.router.add_post(ROUTE, post_inject)
    return app


async def start_inject(ctx: WorkerContext, intake: Intake) -> None:
    """Serve the injection API from this worker (when `[inject] listen` is set)."""
    cfg = ctx.cfg
    if not cfg.inject.listen:
        return
    runner = web.AppRunner(build_inject_app(cfg, intake), access_log=None,
                           handle_signals=False)
    await runner.setup()
    host, port = parse_hostport(cfg.inject.listen)
    try:
        await web.TCPSite(runner, host, port, reuse_port=True, backlog=1024).start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(f"cannot listen on {cfg.inject.listen} ([inject] listen): "
                           f"{exc.strerror}") from None
    ctx.on_close(runner.cleanup)
    log.info("worker %d: injection API on %s", ctx.index, cfg.inject.listen)


def json_error(status: int, message: str, headers: dict[str, str] | None = None
               ) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


async def post_inject(request: web.Request) -> web.Response:
    st = request.app[STATE]
    ip = request.remote or ""
    account = await authenticate(st, ip, request.headers.get("Authorization"))
    if isinstance(account, web.Response):
        return account
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return json_error(413, f"the request is larger than {st.max_request_size} bytes "
                               "([inject] max_request_size)")
    client = Client(ip, trusted=False, helo=f"[{ip}]", extended=True, tls=request.secure,
                    login=account)
    try:
        outcome = await st.injector.inject(client, body)
    except BadRequest as exc:
        return json_error(exc.status, exc.message)
    except Exception:
        log.exception("injection from %s (account %s) failed", ip, account)
        return json_error(500, "internal error; try again later")
    return web.json_response(outcome.as_json(), status=outcome.status)


async def authenticate(st: InjectState, ip: str, header: str | None) -> str | web.Response:
    """The account calling, or the response refusing the request (401, 429)."""
    if st.intake.auth_delay(ip) is None:
        return json_error(429, TOO_MANY)
    credentials = parse_authorization(header)
    if credentials is None:
        return json_error(401, "authenticate as an account: HTTP Basic (account name and "
                               "password or API key) or a bearer API key", CHALLENGE)
    account = st.keys.account(credentials.secret, credentials.user)
    if account is not None:
        st.intake.auth_checked(ip, account, True, CHANNEL)
        return account
    if credentials.user:
        ok = await st.intake.check_login(ip, credentials.user, credentials.secret, CHANNEL)
    else:
        ok = await st.intake.check_limited(ip, "api-key", _refuse, CHANNEL)
    if ok is None:
        return json_error(429, TOO_MANY)
    return credentials.user if ok else json_error(401, "authentication failed", CHALLENGE)


async def _refuse() -> bool:
    return False  # an API key no account has
