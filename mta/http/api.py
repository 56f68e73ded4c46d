"""What the admin API and the dashboard do, without HTTP: reads, actions, audit.

Reads go to LMDB directly (worker 0's read-only transactions, in a thread when they
scan); writes go through worker 0's group committer (inside the `PolicyOperations`).
Figures that cost a scan (queue depth, campaigns, throttle snapshots) are sampled:
recomputed at most every `[http] queue_sample_interval` seconds, and never more
often than 20 times the last scan took, so a huge queue costs a bounded share of CPU.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

from prometheus_client.core import GaugeMetricFamily

from mta.audit import AuditLog, action_record
from mta.egress.status import egress_report
from mta.http.operations import NotFound, PolicyOperations, PolicyUnavailable
from mta.metrics import account_waits, outcome_totals, throughput_history
from mta.outbox import status as outbox_status
from mta.outbox.wiring import write_emitting
from mta.queue.rules import (
    Rule,
    add_rule,
    check_rule,
    lift_rule,
    rules_listing,
    set_campaign_rate,
)
from mta.queue.spool import Spool
from mta.queue.views import message_detail, message_list, queue_stats
from mta.throttle.account_pace import parse_rate
from mta.throughput import Ring

SCAN_SHARE = 20  # wait at least this many times the last scan's duration before the next
TOP_DESTINATIONS = 10
TOP_THROTTLE_ROWS = 20

T = TypeVar("T")


class Sampler:
    """A cached async computation, recomputed when stale; callers share one run."""

    def __init__(self, compute: Callable[[], Awaitable[Any]], min_interval: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.compute = compute
        self.min_interval = min_interval
        self.clock = clock
        self.value: Any = None
        self._at = -float("inf")
        self._interval = min_interval
        self._running: asyncio.Future[Any] | None = None

    def stale(self) -> bool:
        return self.clock() - self._at >= self._interval

    def invalidate(self) -> None:
        self._at = -float("inf")

    async def get(self) -> Any:
        if not self.stale():
            return self.value
        if self._running is None:
            self._running = asyncio.ensure_future(self._refresh())
        running = self._running
        try:
            return await asyncio.shield(running)
        finally:
            if running.done() and self._running is running:
                self._running = None

    async def _refresh(self) -> Any:
        started = self.clock()
        self.value = await self.compute()
        took = self.clock() - started
        self._at = self.clock()
        self._interval = max(self.min_interval, SCAN_SHARE * took)
        return self.value


def load_throttle_rows(spool: Spool) -> list[dict[str, Any]]:
    """Every worker's throttle snapshot rows; [] without the throttle package."""
    try:
        from mta.throttle import load_snapshots
        from mta.throttle.store import DB_NAME as THROTTLE_DB
    except ImportError:
        return []
    return load_snapshots(spool.env, spool.open_db(THROTTLE_DB.decode()))


def storage_figures(spool: Spool) -> dict[str, int]:
    used, size = spool.usage()
    try:
        free = shutil.disk_usage(spool.path).free
    except OSError:
        free = 0
    return {"used_bytes": used, "map_bytes": size, "disk_free_bytes": free}


def busiest_destinations(queue: dict[str, Any], throttle: list[dict[str, Any]]
                         ) -> list[dict[str, Any]]:
    """The domains with the most jobs waiting, each with its throttle state if known."""
    states = {row["destination"]: row for row in throttle}
    rows = []
    for domain, counts in list(queue.get("by_domain", {}).items())[:TOP_DESTINATIONS]:
        row = states.get(domain, {})
        rows.append({"destination": domain, "waiting": sum(counts.values()), **counts,
                     "throttle": row.get("state", "normal"), "reason": row.get("reason", ""),
                     "until": row.get("until")})
    return rows


def throttle_summary(rows: list[dict[str, Any]], limit: int = TOP_THROTTLE_ROWS
                     ) -> list[dict[str, Any]]:
    """Rows merged across workers per destination, busiest (most sent) first."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        key = (row["kind"], row["destination"])
        if key not in merged:
            merged[key] = {k: row.get(k) for k in (
                "destination", "kind", "state", "reason", "until", "rate", "connections",
                "max_connections", "sent", "deferred")}
            continue
        into = merged[key]
        for k in ("connections", "max_connections", "sent", "deferred"):
            into[k] = (into[k] or 0) + (row.get(k) or 0)
        into["rate"] = None if into["rate"] is None or row.get("rate") is None else (
            into["rate"] + row["rate"])
        if row.get("state") != "normal":
            into["state"], into["reason"] = row["state"], row.get("reason")
    return sorted(merged.values(), key=lambda r: -(r["sent"] or 0))[:limit]


class AdminApi:
    def __init__(self, cfg: Any, spool: Spool, policy: PolicyOperations,
                 audit: AuditLog | None = None, metrics_registry: Any = None,
                 throughput: Ring | None = None, submit: Callable[[Any], Any] | None = None,
                 emit: Callable[[dict[str, Any]], None] | None = None,
                 outbox: Any = None) -> None:
        self.cfg = cfg
        self.outbox = outbox  # mta.outbox.wiring.OutboxRecorder (its dispatcher: live state)
        self.submit = submit  # worker 0's group committer, for the queue rules
        self.emit = emit or (lambda event: None)
        self.throughput = throughput  # this worker's ring (the others' are read from files)
        self.spool = spool
        self.policy = policy
        self.audit = audit
        self.metrics_registry = metrics_registry
        interval = cfg.http.queue_sample_interval
        self.queue_sampler = Sampler(lambda: asyncio.to_thread(queue_stats, spool), interval)
        self.campaign_sampler = Sampler(lambda: self.policy.campaigns(), interval)
        self.throttle_sampler = Sampler(
            lambda: asyncio.to_thread(load_throttle_rows, spool), min(interval, 1.0))

    # --- reads -----------------------------------------------------------------------------

    async def queue(self) -> dict[str, Any]:
        return await asyncio.to_thread(queue_stats, self.spool)

    async def message(self, message_id: str) -> dict[str, Any] | None:
        return await asyncio.to_thread(message_detail, self.spool, message_id)

    async def messages(self, limit: int) -> list[dict[str, Any]]:
        return await asyncio.to_thread(message_list, self.spool, limit)

    async def throttle(self) -> list[dict[str, Any]]:
        return await asyncio.to_thread(load_throttle_rows, self.spool)

    async def egress(self) -> dict[str, Any]:
        """Sources and pools with their per-provider counts (mta.egress.status)."""
        return await asyncio.to_thread(egress_report, self.cfg, self.spool)

    async def campaigns(self) -> dict[str, Any]:
        return {"thresholds": self.policy.thresholds(), "campaigns": await self.policy.campaigns()}

    async def dashboard(self) -> dict[str, Any]:
        queue = await self.queue_sampler.get()
        campaigns = await self.campaign_sampler.get()
        throttle = await self.throttle_sampler.get()
        now = time.time()
        return {
            "time": now,
            "totals": outcome_totals(self.metrics_registry),
            "throughput": await asyncio.to_thread(throughput_history, self.throughput, now),
            "queue": {k: queue[k] for k in ("total", "jobs", "recipients", "by_state")},
            "storage": storage_figures(self.spool),
            "destinations": busiest_destinations(queue, throttle),
            "throttle": throttle_summary(throttle),
            "thresholds": self.policy.thresholds(),
            "campaigns": campaigns,
            "account_waits": self.account_waits(),
            "egress": (await self.egress())["sources"] if self.cfg.egress.sources else [],
            "webhooks": await self.webhooks() if outbox_status.configured(self.cfg) else None,
        }

    def account_waits(self) -> dict[str, float]:
        """Per paced account, its queue's wait (seconds; mta.throttle.account_pace)."""
        return account_waits(self.metrics_registry)

    def with_wait(self, row: dict[str, Any]) -> dict[str, Any]:
        """A paced account's row with its queue's wait (seconds, 0.0: not waiting); the
        row of an account without a pace as it is."""
        name = row.get("name", "")
        waits = self.account_waits()
        account = self.cfg.account(name)
        if name not in waits and not (account is not None and account.max_rate):
            return row
        return row | {"queue_wait": waits.get(name, 0.0)}

    async def _write_emitting(self, fn: Callable[[Any], T],
                              events_of: Callable[[T], list[dict[str, Any]]]) -> T:
        """`fn` in a write transaction with its events recorded there for the event outbox
        (when one is kept), emitted once committed (mta.outbox.wiring)."""
        assert self.submit is not None
        record = self.outbox.record if self.outbox is not None else None
        return await write_emitting(self.submit, record, self.emit, fn, events_of)

    # --- queue rules: suspend or bounce by scope, with an expiry (mta.queue.rules) ----------

    async def queue_rules(self) -> list[dict[str, Any]]:
        return await asyncio.to_thread(rules_listing, self.spool)

    async def add_queue_rule(self, rule: Rule) -> dict[str, Any]:
        if self.submit is None:
            raise PolicyUnavailable("this worker cannot write the spool")
        done = await self._write_emitting(
            lambda txn: add_rule(self.spool, txn, rule, time.time()),
            lambda done: [{"type": "QueueRuleAdded", **rule.as_dict(), **done}])
        return {"rule": rule.as_dict(), **done}

    async def lift_queue_rule(self, action: str, scope: str, value: str) -> dict[str, Any]:
        if self.submit is None:
            raise PolicyUnavailable("this worker cannot write the spool")
        value = check_rule(action, scope, value)
        done = await self._write_emitting(
            lambda txn: lift_rule(self.spool, txn, action, scope, value, time.time()),
            lambda done: [] if done is None else [
                {"type": "QueueRuleLifted", "action": action, "scope": scope,
                 "value": value, "by": "operator", "released": done["released"]}])
        if done is None:
            raise NotFound(f"no {action} rule for {scope} {value!r}")
        return done

    async def set_campaign_rate(self, account: str, campaign: str, max_rate: str
                                ) -> dict[str, Any]:
        """A campaign's sending rate ("100/m"; "" removes it): its mail is paced out."""
        if self.submit is None:
            raise PolicyUnavailable("this worker cannot write the spool")
        per_second = parse_rate(max_rate) if max_rate else None
        await self._write_emitting(
            lambda txn: set_campaign_rate(self.spool, txn, account, campaign, per_second),
            lambda _: [{"type": "CampaignRate", "account": account, "campaign": campaign,
                        "max_rate": max_rate}])
        return {"account": account, "campaign": campaign, "max_rate": max_rate,
                "per_second": per_second}

    # --- the event outbox: webhooks and AMQP sinks (mta.outbox.status) ----------------------

    async def webhooks(self) -> dict[str, Any]:
        dispatcher = getattr(self.outbox, "dispatcher", None)
        live = dispatcher.status if dispatcher is not None else None
        now = time.time()
        rows = await asyncio.to_thread(outbox_status.sink_rows, self.spool, self.cfg, now, live)
        outbox = await asyncio.to_thread(outbox_status.summary, self.spool, self.cfg, now)
        return {"outbox": outbox, "sinks": rows}

    async def webhook_dead(self, name: str, limit: int) -> list[dict[str, Any]]:
        return await asyncio.to_thread(outbox_status.dead_rows, self.spool, self.cfg, name,
                                       limit)

    async def webhook_replay(self, name: str) -> dict[str, Any]:
        if self.submit is None:
            raise PolicyUnavailable("this worker cannot write the spool")
        replayed = await self.submit(outbox_status.replay_op(self.spool, self.cfg, name))
        dispatcher = getattr(self.outbox, "dispatcher", None)
        if dispatcher is not None:
            dispatcher.wake()
        return {"sink": name, "replayed": replayed}

    # --- actions ---------------------------------------------------------------------------

    async def act(self, who: tuple[str, str], action: str, obj: str,
                  run: Callable[[], Awaitable[Any]], **details: Any) -> Any:
        """Run an operator action and record it in the audit log, whatever the result."""
        client, identity = who
        try:
            result = await run()
        except Exception as exc:
            self._record(action_record(client, identity, action, obj,
                                       f"error: {type(exc).__name__}: {exc}", **details))
            raise
        self._record(action_record(client, identity, action, obj, "ok", **details))
        self.queue_sampler.invalidate()
        self.campaign_sampler.invalidate()
        return result

    def _record(self, record: dict[str, Any]) -> None:
        if self.audit is not None:
            self.audit.record(record)

    # --- scrape-time metrics ---------------------------------------------------------------

    async def refresh_for_scrape(self) -> None:
        await asyncio.gather(self.queue_sampler.get(), self.campaign_sampler.get(),
                             self.throttle_sampler.get())

    def collector(self) -> ScrapeCollector:
        return ScrapeCollector(self)


class ScrapeCollector:
    """Figures worker 0 samples from LMDB, in the /metrics output (prometheus Collector)."""

    def __init__(self, admin: AdminApi) -> None:
        self.admin = admin

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield from queue_families(self.admin.queue_sampler.value)
        yield from storage_families(storage_figures(self.admin.spool))
        yield from throttle_families(self.admin.throttle_sampler.value or [])
        yield from outbox_status.families(self.admin.spool, self.admin.cfg, time.time())
        paused = GaugeMetricFamily("mta_campaigns_paused", "Campaigns paused now")
        paused.add_metric([], sum(1 for c in self.admin.campaign_sampler.value or []
                                  if c.get("paused")))
        yield paused


def queue_families(stats: dict[str, Any] | None) -> Iterator[GaugeMetricFamily]:
    if stats is None:
        return
    depth = GaugeMetricFamily("mta_queue_depth", "Delivery jobs in the spool by state",
                              labels=["state"])
    for state in ("queued", "deferred", "held"):
        depth.add_metric([state], stats["by_state"].get(state, 0))
    yield depth
    yield GaugeMetricFamily("mta_queue_messages", "Messages in the spool", value=stats["total"])
    yield GaugeMetricFamily("mta_queue_recipients", "Recipients waiting for delivery",
                            value=stats["recipients"])


def storage_families(figures: dict[str, int]) -> Iterator[GaugeMetricFamily]:
    yield GaugeMetricFamily("mta_spool_used_bytes", "Bytes used inside the spool's LMDB map",
                            value=figures["used_bytes"])
    yield GaugeMetricFamily("mta_spool_map_size_bytes", "Largest size the spool may grow to",
                            value=figures["map_bytes"])
    yield GaugeMetricFamily("mta_spool_disk_free_bytes", "Free bytes on the spool's disk",
                            value=figures["disk_free_bytes"])


def throttle_families(rows: list[dict[str, Any]]) -> Iterator[GaugeMetricFamily]:
    states = GaugeMetricFamily("mta_throttle_destinations",
                               "Throttle scopes by kind and state (summed over workers)",
                               labels=["kind", "state"])
    counts: dict[tuple[str, str], int] = {}
    for row in rows:
        key = (row["kind"], row["state"])
        counts[key] = counts.get(key, 0) + 1
    for (kind, state), count in sorted(counts.items()):
        states.add_metric([kind, state], count)
    yield states
    rate = GaugeMetricFamily("mta_throttle_provider_rate",
                             "Current message rate limit per provider (messages/s)",
                             labels=["provider"])
    conns = GaugeMetricFamily("mta_throttle_provider_max_connections",
                              "Current connection limit per provider", labels=["provider"])
    for row in throttle_summary([r for r in rows if r["kind"] == "provider"], len(rows)):
        if row["rate"] is not None:
            rate.add_metric([row["destination"]], row["rate"])
        conns.add_metric([row["destination"]], row["max_connections"] or 0)
    yield rate
    yield conns
