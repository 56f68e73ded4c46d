"""Delivery in one worker: resolver, scheduler and deliverer wired together, with events."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from mta.bounce.reply import classify_reply
from mta.cluster.throttle import start_cluster_throttle
from mta.config import Config, parse_hostport, shipped_path
from mta.delivery.deliverer import Deliverer
from mta.delivery.dsn import build_dsn, should_notify
from mta.delivery.inbound import InboundHandler, verp_secret, verp_transform
from mta.delivery.lines import wrap_long_lines
from mta.delivery.mx import MxResolver
from mta.dkim.signer import DkimSigner
from mta.queue.outcome import AttemptOutcome, RcptResult
from mta.queue.scheduler import Item, Scheduler
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
            "attempt": item.job["attempts"],
            "age": round(time.time() - item.message["received"], 3)}
    # The engine's own mail (DSNs, policy notices) never counts against a campaign.
    if item.message.get("dsn_for"):
        base["dsn"] = True
    if item.message.get("notice"):
        base["notice"] = True
    events = []
    for attr, kind in EVENT_TYPES:
        for r in getattr(outcome, attr):
            event = {"type": "InboundProcessed" if local else kind, **base,
                     "recipient": r.recipient, "mx": r.mx, "code": r.code,
                     "status": r.enhanced, "reply": r.text[:500]}
            if not r.delivered:
                event["kind"], event["reason"] = classify_reply(r.code, r.enhanced, r.text)
            if r.possible_duplicate or (item.maybe_sent and r.delivered):
                event["possible_duplicate"] = True
            events.append(event)
    return events


def dkim_transform(signer: DkimSigner) -> Any:
    """Signs what is sent, last of the transforms, just before sending."""

    def sign(item: Item, sender: str, data: bytes) -> tuple[str, bytes]:
        return sender, signer.sign(data)

    return sign


def line_wrap_transform(limit: int) -> Any:
    """Breaks lines over `limit` octets, before signing (mta.delivery.lines)."""

    def wrap(item: Item, sender: str, data: bytes) -> tuple[str, bytes]:
        return sender, wrap_long_lines(data, limit)

    return wrap


def check_delivery_config(cfg: Config) -> None:
    """Stops `mta serve` at start, with one line, on a bad DKIM key or shaping file."""
    if cfg.dkim.keys:
        DkimSigner.from_config(cfg.dkim)
    load_shaping(shipped_path(cfg.throttle.shaping_file))


async def save_throttle_state(worker: Any, throttle: Throttle, interval: float = 1.0) -> None:
    """Keeps `mta throttle status` current: this worker's snapshot, once a second."""
    while True:
        await asyncio.sleep(interval)
        try:
            await worker.committer.submit(
                snapshot_op(worker.spool.env, worker.index, throttle.snapshot()))
        except Exception:
            log.exception("could not save the throttle snapshot")


def start_delivery(worker: Any) -> Deliverer:
    cfg: Config = worker.cfg
    listen_host, listen_port = parse_hostport(cfg.smtp.listen)
    # Our own listener is a loop target only where delivery would reach it.
    own = {listen_host} if listen_port == cfg.delivery.port else set()
    resolver = MxResolver(cfg.dns, allow_loopback_mx=cfg.delivery.allow_loopback_mx,
                          max_addresses=cfg.delivery.max_mx_addresses, own_addresses=own)
    # With a cluster, each worker keeps the whole budget and Redis holds it across all
    # workers of all nodes (mta.cluster.throttle); else each worker keeps its share.
    sharing = 1 if getattr(worker, "cluster", None) is not None else worker.workers
    throttle = Throttle(load_shaping(shipped_path(cfg.throttle.shaping_file)), worker.index, sharing,
                        on_event=lambda event: worker.emit({"type": "ThrottleChange", **event}))
    deliverer = Deliverer(cfg, resolver, throttle)
    deliverer.cluster = start_cluster_throttle(worker, throttle)
    if deliverer.cluster is not None:
        deliverer.cluster.on_excess = deliverer.wake_idle
    worker.dkim_signer = DkimSigner.from_config(cfg.dkim) if cfg.dkim.keys else None
    if cfg.delivery.line_length_limit:
        deliverer.transforms.append(line_wrap_transform(cfg.delivery.line_length_limit))
    if worker.dkim_signer is not None:
        deliverer.transforms.append(dkim_transform(worker.dkim_signer))
    deliverer.local_domains = bounce_domains(cfg) | {d.lower() for d in cfg.smtp.local_domains}
    secret = verp_secret(cfg, worker.spool)
    if cfg.bounce.verp:
        deliverer.transforms.insert(0, verp_transform(cfg, secret))

    def on_outcome(item: Item, outcome: AttemptOutcome) -> None:
        for event in outcome_events(item, outcome, item.domain in deliverer.local_domains):
            worker.emit(event)

    scheduler = Scheduler(worker.spool, worker.committer, cfg.delivery, worker.index,
                          worker.workers, dispatch=deliverer.dispatch, on_outcome=on_outcome,
                          build_dsn=make_dsn_builder(cfg))
    deliverer.scheduler = scheduler
    worker.inbound = deliverer.local_handler = InboundHandler(
        cfg, worker.spool, worker.emit, scheduler.complete, secret)
    worker.intake.on_stored = scheduler.notify_stored
    scheduler.start()

    snapshots = asyncio.get_running_loop().create_task(save_throttle_state(worker, throttle))

    async def close() -> None:
        snapshots.cancel()
        await scheduler.stop()
        await deliverer.close()

    worker.closers.append(close)
    worker.scheduler = scheduler
    return deliverer
