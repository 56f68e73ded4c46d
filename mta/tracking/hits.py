"""Requests on the public tracking endpoints turned into answers and events.

`Tracker.click(token, ...)` gives the URL to redirect to (None: 404, "" for the hidden
link: nothing to follow), `Tracker.open(token, ...)` whether the pixel is genuine; each
genuine request becomes one ``Open`` or ``Click`` event (time, user agent, client
address kept as `[tracking] client_address` says, the class and the rule that decided),
emitted when its class is decided (early clicks wait, see mta.tracking.classify).
With the event outbox (webhooks, AMQP) an event is appended to it in the transaction
that counts it, and goes to the event log once that transaction has committed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from mta.config import Config, TrackingConfig
from mta.tracking.classify import Bursts, Hit, classify
from mta.tracking.shared import LocalEngagement, SharedEngagement
from mta.tracking.stats import apply_events, open_dbs
from mta.tracking.tokens import CLICK, HIDDEN, OPEN, read_token

log = logging.getLogger("mta.tracking")
MAX_AGENT = 256
TICK = 0.25  # seconds between checks for closed windows


def kept_address(client: str, mode: str, secret: bytes) -> str:
    if mode == "full":
        return client
    if mode == "none" or not client:
        return ""
    if mode == "hash":
        return hmac.new(secret, b"client:" + client.encode(), hashlib.sha256).hexdigest()[:16]
    try:
        ip = ipaddress.ip_address(client)
    except ValueError:
        return ""
    prefix = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False).network_address)


class Tracker:
    def __init__(self, tc: TrackingConfig, secret: bytes, emit: Callable[[dict[str, Any]], None],
                 clock: Callable[[], float] = time.time, spool: Any = None,
                 submit: Callable[[Callable[[Any], Any]], Awaitable[Any]] | None = None,
                 shared: SharedEngagement | None = None,
                 record_events: Callable[[Any, list[dict[str, Any]]], None] | None = None
                 ) -> None:
        self.tc = tc
        self.secret = secret
        self.emit = emit
        self.clock = clock
        self.spool = spool  # with `submit` (the group committer): counters in LMDB
        self.submit = submit
        self.shared: SharedEngagement = shared or LocalEngagement()  # other nodes' counts
        # The event outbox's append (mta.outbox.wiring.OutboxRecorder.record), with the counts.
        self.record_events = record_events if submit is not None else None
        self.batch: list[dict[str, Any]] = []
        if spool is not None:
            open_dbs(spool)
        self.bursts = Bursts(tc.scanner_window)
        self.counts: Counter[str] = Counter()
        self._task: asyncio.Task[None] | None = None

    def click(self, token: str, method: str, agent: str, client: str) -> str | None:
        target = read_token(self.secret, token, CLICK)
        if target is None:
            self.counts["forged"] += 1
            return None
        self._record(Hit(target, method, agent, client, self.clock()))
        return "" if target.index == HIDDEN else target.url

    def open(self, token: str, method: str, agent: str, client: str) -> bool:
        target = read_token(self.secret, token, OPEN)
        if target is None:
            self.counts["forged"] += 1
            return False
        self._record(Hit(target, method, agent, client, self.clock()))
        return True

    def _record(self, hit: Hit) -> None:
        for decided in classify(hit, self.tc.machine_agents, self.bursts):
            self._emit(decided)

    def _emit(self, hit: Hit) -> None:
        t = hit.target
        kind = "Click" if t.kind == CLICK else "Open"
        self.counts[f"{kind.lower()}_{hit.verdict}"] += 1
        event: dict[str, Any] = {
            "type": kind, "time": round(hit.at, 3), "account": t.account,
            "campaign": t.campaign, "message": t.message, "recipient": t.recipient,
            "class": hit.verdict, "rule": hit.rule, "method": hit.method,
            "user_agent": hit.agent[:MAX_AGENT],
            "client": kept_address(hit.client, self.tc.client_address, self.secret),
            "seconds_after_delivery": round(hit.at - t.sent_at, 1)}
        if t.kind == CLICK:
            event["link"] = t.url
            event["index"] = t.index
        if self.record_events is None:
            self.emit(event)  # else once counted and in the outbox (`write`)
        if self.submit is not None:
            self.batch.append(event)

    def tick(self, everything: bool = False) -> None:
        for hit in self.bursts.due(self.clock(), everything):
            self._emit(hit)

    # --- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            self.tick()
            try:
                await self.write()
            except Exception:
                log.exception("engagement counters not written")

    async def write(self) -> None:
        """Count the decided hits in LMDB (one group transaction per batch), keeping them
        in the same transaction for the other nodes; then share them."""
        if self.batch and self.submit is not None:
            events, self.batch = self.batch, []
            try:
                await self.submit(lambda txn: self._count(txn, events))
            except Exception:
                for event in events if self.record_events else ():
                    event.pop("event_id", None)  # not in the outbox: the log's listener tries
                raise
            finally:
                for event in events if self.record_events else ():
                    self.emit(event)
        await self.shared.share()

    def _count(self, txn: Any, events: list[dict[str, Any]]) -> None:
        apply_events(self.spool, txn, events)
        self.shared.keep(txn, events)
        if self.record_events is not None:
            self.record_events(txn, events)  # the webhooks' copy, with the counts

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.tick(everything=True)  # early clicks still waiting: a person's
        try:
            await self.write()
        except Exception:
            log.exception("engagement counters not written")


def tracking_secret(cfg: Config, spool: Any) -> bytes:
    """[tracking] secret; when it is empty, on several nodes a key derived from the
    shared [policy] unsubscribe_secret (a link sent by node A may be clicked on node B),
    on one node the spool's own random key."""
    if cfg.tracking.secret:
        return cfg.tracking.secret.encode()
    if cfg.cluster.redis and cfg.policy.unsubscribe_secret:
        return hmac.new(cfg.policy.unsubscribe_secret.encode(), b"mta tracking tokens",
                        hashlib.sha256).digest()
    return bytes(spool.secret("tracking"))
