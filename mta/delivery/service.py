"""Delivery's pieces that the engine wires into a worker (mta/engine.py): the DSN
builder, the events of an attempt's outcome, the transforms of outgoing mail, the
resolver and throttle of a worker, and the throttle's snapshots."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from mta.bounce.reply import classify_reply
from mta.config import Config, parse_hostport
from mta.context import WorkerContext
from mta.delivery.deliverer import Transform
from mta.delivery.dsn import build_dsn, should_notify
from mta.delivery.lines import wrap_long_lines
from mta.delivery.mx import MxResolver
from mta.dkim.signer import DkimSigner
from mta.queue.outcome import AttemptOutcome, RcptResult
from mta.queue.scheduler import Item
from mta.queue.spool import NewMessage
from mta.throttle import Throttle, load_shaping, snapshot_op

log = logging.getLogger("mta.delivery")

EVENT_TYPES = (("delivered", "Delivery"), ("deferred", "TransientFailure"),
               ("bounced", "Bounce"), ("expired", "Expiration"))


def bounce_domains(cfg: Config) -> set[str]:
    return {d.lower() for d in (cfg.bounce.domain, cfg.bounce.fbl_domain) if d}


def make_dsn_builder(cfg: Config) -> Any:
    own = bounce_domains(cfg)

    def build(message: dict[str, Any], failed: list[RcptResult], expired: bool
              ) -> NewMessage | None:
        if not should_notify(message["from"], own):
            return None
        return NewMessage(
            sender="", recipients=[message["from"]],
            data=build_dsn(message, failed, cfg.engine.hostname, expired=expired),
            account=message.get("account", ""), extra={"dsn_for": message["id"]})

    return build


def outcome_events(item: Item, outcome: AttemptOutcome, local: bool = False
                   ) -> list[dict[str, Any]]:
    """One event per recipient result, as the event log records them.

    Failures carry the bounce taxonomy's kind (hard/soft) and reason; mail for
    the engine's own domains is recorded as InboundProcessed, not as a delivery.
    """
    base = {"id": item.message["id"], "account": item.message.get("account", ""),
            "campaign": item.message.get("campaign", ""), "domain": item.domain,
            "attempt": item.job.attempts,
            "age": round(time.time() - item.message["received"], 3)}
    # The engine's own mail (DSNs, policy notices) never counts against a campaign.
    if item.message.get("dsn_for"):
        base["dsn"] = True
    if item.message.get("notice"):
        base["notice"] = True
    if item.source:  # the egress source (mta.egress) that carried it, and its provider
        base["source"] = item.source
        base["provider"] = item.provider
        base["egress_provider"] = item.egress_provider  # the warm-up caps' key (mta.egress)
    events = []
    for attr, kind in EVENT_TYPES:
        for r in getattr(outcome, attr):
            event = {"type": "InboundProcessed" if local else kind, **base,
                     "recipient": r.recipient, "mx": r.mx, "code": r.code,
                     "status": r.enhanced, "reply": r.text[:500]}
            if r.tls:  # TLS version, cipher, verified, which policy applied
                event.update(r.tls)
            if not r.delivered:
                event["kind"], event["reason"] = classify_reply(r.code, r.enhanced, r.text)
            if r.possible_duplicate or (item.maybe_sent and r.delivered):
                event["possible_duplicate"] = True
            events.append(event)
    return events


def dkim_transform(signer: DkimSigner) -> Transform:
    """Signs what is sent, last of the transforms, just before sending."""

    def sign(item: Item, recipients: list[str], sender: str, data: bytes) -> tuple[str, bytes]:
        return sender, signer.sign(data)

    return sign


def line_wrap_transform(limit: int) -> Transform:
    """Breaks lines over `limit` octets, before signing (mta.delivery.lines)."""

    def wrap(item: Item, recipients: list[str], sender: str, data: bytes) -> tuple[str, bytes]:
        return sender, wrap_long_lines(data, limit)

    return wrap


def check_delivery_config(cfg: Config) -> None:
    """Stops `mta serve` at start, with one line, on a bad DKIM key or shaping file."""
    if cfg.dkim.keys:
        DkimSigner.from_config(cfg.dkim)
    load_shaping(cfg.throttle.shaping_file)


def make_resolver(cfg: Config) -> MxResolver:
    listen_host, listen_port = parse_hostport(cfg.smtp.listen)
    # Our own listener is a loop target only where delivery would reach it.
    own = {listen_host} if listen_port == cfg.delivery.port else set()
    return MxResolver(cfg.dns, allow_loopback_mx=cfg.delivery.allow_loopback_mx,
                      max_addresses=cfg.delivery.max_mx_addresses, own_addresses=own)


def make_throttle(ctx: WorkerContext, shared: bool) -> Throttle:
    """This worker's throttle: its share of each budget (split among the workers that
    deliver), or (`shared`: the budget is held across all workers of all nodes,
    mta.throttle.shared) the whole of it."""
    cfg = ctx.cfg
    return Throttle(load_shaping(cfg.throttle.shaping_file), ctx.seat.share,
                    1 if shared else ctx.seat.sharers,
                    on_event=lambda event: ctx.emit({"type": "ThrottleChange", **event}),
                    label=ctx.index)


def emit_outcomes(ctx: WorkerContext, local_domains: set[str]
                  ) -> Callable[[Item, AttemptOutcome], None]:
    def emit(item: Item, outcome: AttemptOutcome) -> None:
        events = outcome.events or outcome_events(item, outcome, item.domain in local_domains)
        for event in events:
            ctx.emit(event)

    return emit


def record_outcome_events(ctx: WorkerContext, local_domains: set[str]
                          ) -> Callable[[Any, Item, AttemptOutcome], None] | None:
    """With an event outbox (mta.outbox.wiring): an outcome's events are built and appended
    to it inside the outcome's write transaction (`emit_outcomes` then logs the same ones)."""
    outbox = ctx.outbox
    if outbox is None:
        return None

    def record(txn: Any, item: Item, outcome: AttemptOutcome) -> None:
        outcome.events = outcome_events(item, outcome, item.domain in local_domains)
        outbox.record(txn, outcome.events)

    return record


def keep_throttle_snapshots(ctx: WorkerContext, throttle: Throttle,
                            interval: float = 1.0) -> None:
    """Keeps `mta throttle status` current: this worker's snapshot, once a second."""

    async def save_forever() -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await ctx.committer.submit(
                    snapshot_op(ctx.spool.env, ctx.index, throttle.snapshot()))
            except Exception:
                log.exception("could not save the throttle snapshot")

    task = asyncio.get_running_loop().create_task(save_forever())

    async def close() -> None:
        task.cancel()

    ctx.on_close(close)
