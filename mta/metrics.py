"""Prometheus metrics, correct across the engine's worker processes.

How it works with N workers (prometheus-client's multiprocess mode):

- The supervisor calls `prepare_metrics_dir(cfg)` before it forks: it points
  ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory. Every worker's counters,
  histograms and gauges are memory-mapped files there, one set per process.
- The supervisor calls `metrics_process_dead(pid)` when a worker exits, so the
  live gauges (mode ``livesum``) of a dead worker stop counting; its counters stay,
  so totals never go backwards when a worker is restarted.
- Each worker calls `start_metrics(worker)`: an `EngineMetrics` fed by its event log
  (`EngineMetrics.on_event`) and a sampler task for its live figures (open
  connections per provider, deliveries in flight, DKIM signatures, spool commits).
- Worker 0 serves ``/metrics`` (mta.http): a `MultiProcessCollector` over the
  directory, plus figures sampled at scrape time from LMDB (queue depth, spool
  size, free disk, throttle state, paused campaigns; see mta.http.admin).

Outcome counters are labelled by destination *provider* (the throttle's shaping file
groups MX hosts into providers), never by recipient domain, so cardinality stays
bounded; a destination no provider claims is "other".
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import values as prometheus_values
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from mta.context import WorkerContext
from mta.egress.counters import outcome_of as egress_outcome
from mta.throughput import Ring, history, remove_rings, ring_for_process

if TYPE_CHECKING:
    from mta.delivery.deliverer import Deliverer
    from mta.dkim.signer import DkimSigner
    from mta.policy.guard import PolicyGuard
    from mta.queue.scheduler import Scheduler

log = logging.getLogger("mta.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
OTHER = "other"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
                   3600.0, 14_400.0, 86_400.0, 432_000.0)
PACE_BUCKETS = (0.0, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14_400.0)
OUTCOMES = {"Delivery": "delivered", "TransientFailure": "deferred", "Bounce": "bounced",
            "Expiration": "expired"}
FEEDBACK_KINDS = frozenset({"hard", "soft", "unknown"})
_PROVIDER_CACHE_MAX = 10_000


# --- the multiprocess directory (supervisor side) ----------------------------------------

def prepare_metrics_dir(cfg: Any) -> str:
    """Point prometheus-client at a fresh directory; call before forking the workers.

    `[http] metrics_dir` when set (its old files are removed), else a new temporary
    directory (remove it with `cleanup_metrics_dir` when the engine stops)."""
    path = cfg.http.metrics_dir or tempfile.mkdtemp(prefix="mta-metrics-")
    Path(path).mkdir(parents=True, exist_ok=True)
    for stale in glob.glob(os.path.join(path, "*.db")):
        os.unlink(stale)
    remove_rings(path)
    os.environ[MULTIPROC_ENV] = path
    # prometheus-client picks its value class when first imported; pick it again.
    prometheus_values.ValueClass = prometheus_values.MultiProcessValue(current_pid)
    return path


class _Pid:
    """This process's id, kept: prometheus-client's multiprocess values ask for it on
    every update, to notice a fork, and os.getpid is a system call each time (glibc
    stopped caching it). It changes only in a forked child, which refreshes it."""

    value = os.getpid()

    @classmethod
    def refresh(cls) -> None:
        cls.value = os.getpid()


os.register_at_fork(after_in_child=_Pid.refresh)


def current_pid() -> int:
    return _Pid.value


def metrics_process_dead(pid: int) -> None:
    """A worker exited: its live gauges stop counting (its counters are kept)."""
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        with contextlib.suppress(OSError):
            mark_process_dead(pid, path)


def cleanup_metrics_dir(cfg: Any, path: str) -> None:
    """Remove the directory `prepare_metrics_dir` made (a configured one is kept)."""
    if not cfg.http.metrics_dir:
        shutil.rmtree(path, ignore_errors=True)


def multiprocess_enabled() -> bool:
    path = os.environ.get(MULTIPROC_ENV)
    return bool(path) and os.path.isdir(path or "")


def render(local: CollectorRegistry | None, extra: Iterable[Any] = ()) -> bytes:
    """The Prometheus text exposition: every process's metrics plus `extra` collectors."""
    registry = CollectorRegistry(auto_describe=False)
    if multiprocess_enabled():
        MultiProcessCollector(registry)
    elif local is not None:
        registry.register(_Forward(local))
    for collector in extra:
        registry.register(collector)
    return generate_latest(registry)


class _Forward:
    """This process's registry as one collector of another registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterable[Any]:
        return self.registry.collect()


# --- providers ---------------------------------------------------------------------------

class ProviderNames:
    """MX host -> provider label, by the throttle's shaping file (cached, bounded)."""

    def __init__(self, shaping: Any = None) -> None:
        self.shaping = shaping
        self._cache: dict[tuple[str, str], str] = {}

    def of(self, mx_hosts: list[str], domain: str = "") -> str:
        if self.shaping is None:
            return OTHER
        key = (mx_hosts[0] if mx_hosts else "", domain)
        name = self._cache.get(key)
        if name is None:
            provider = self.shaping.provider(domain, [h for h in mx_hosts if h])
            name = provider.name if provider is not None else OTHER
            if len(self._cache) >= _PROVIDER_CACHE_MAX:
                self._cache.clear()
            self._cache[key] = name
        return name


def load_provider_names(cfg: Any, throttle: Any = None) -> ProviderNames:
    """The running throttle's shaping, else the shaping file, else no providers."""
    shaping = getattr(throttle, "shaping", None)
    if shaping is None:
        try:
            from mta.throttle import load_shaping

            shaping = load_shaping(cfg.throttle.shaping_file)
        except Exception:  # no throttle package, or no usable shaping file: all "other"
            shaping = None
    return ProviderNames(shaping)


# --- one worker's metrics ----------------------------------------------------------------

def feedback_kind(event: dict[str, Any]) -> str | None:
    """The `mta_feedback_total` kind of an event, or None when it is no feedback."""
    kind = event.get("type")
    if kind == "Bounce":
        sub = event.get("kind")
        return f"{sub}_bounce" if sub in FEEDBACK_KINDS else "bounce"
    return {"Complaint": "complaint", "Unsubscribe": "unsubscribe",
            "AutoReply": "autoreply"}.get(str(kind))


class EngineMetrics:
    """The metrics one worker process records; `on_event` is its EventLog listener."""

    def __init__(self, providers: ProviderNames | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        self.providers = providers or ProviderNames()
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.received = Counter("mta_messages_received", "Messages accepted (250 after DATA)",
                                registry=r)
        self.received_rcpts = Counter("mta_recipients_received",
                                      "Recipients of the messages accepted", registry=r)
        self.outcomes = {
            outcome: Counter(f"mta_messages_{outcome}",
                             f"Recipient outcomes: {outcome}, by destination provider",
                             ["provider"], registry=r)
            for outcome in OUTCOMES.values()}
        self.latency = Histogram("mta_delivery_latency_seconds",
                                 "Seconds from acceptance to delivery, per recipient",
                                 ["provider"], buckets=LATENCY_BUCKETS, registry=r)
        self.feedback = Counter("mta_feedback", "Bounces, complaints, unsubscribes, auto-replies"
                                " by kind", ["kind"], registry=r)
        self.smtp_auth = Counter("mta_smtp_auth", "SMTP AUTH attempts by result", ["result"],
                                 registry=r)
        self.campaign_pauses = Counter("mta_campaign_pauses",
                                       "Campaign pauses (by the policy guard or an operator)", registry=r)
        self.connections = Gauge("mta_open_connections",
                                 "Outbound SMTP connections open or opening, by provider",
                                 ["provider"], multiprocess_mode="livesum", registry=r)
        self.in_flight = Gauge("mta_deliveries_in_flight", "Delivery attempts under way",
                               multiprocess_mode="livesum", registry=r)
        self.dkim = Counter("mta_dkim_signatures", "Outgoing messages signed or left unsigned",
                            ["result"], registry=r)
        self.intake_yields = Counter("mta_delivery_intake_yields",
                                     "Times bulk delivery yielded to a busy intake "
                                     "([delivery] yield_to_intake)", registry=r)
        self.commits = Counter("mta_spool_commits", "Spool write transactions (fsyncs)",
                               registry=r)
        self.commit_ops = Counter("mta_spool_commit_operations",
                                  "Spool writes grouped into those transactions", registry=r)
        self.policy_actions = Counter(
            "mta_policy_actions", "What the policy guard did: refusals by reason, holds, "
            "pauses, footers, List-Unsubscribe headers, forged tokens", ["action"], registry=r)
        self.cluster_up = Gauge("mta_cluster_redis_up", "1 while the worker reaches the "
                                "cluster's Redis, 0 while it runs on local limits",
                                ["worker"], multiprocess_mode="livemax", registry=r)
        self.cluster_outages = Counter("mta_cluster_redis_outages",
                                       "Times a worker lost the cluster's Redis", registry=r)
        self.tls_sessions = Counter("mta_tls_sessions", "Outbound SMTP sessions by the TLS "
                                    "policy that applied and the result", ["policy", "result"],
                                    registry=r)
        self.egress = Counter("mta_egress_messages", "Recipient outcomes (delivered, deferred, "
                              "bounced, complained) by egress source and provider",
                              ["source", "provider", "outcome"], registry=r)
        self.egress_up = Gauge("mta_egress_source_up", "1 while an egress source is up, 0 "
                               "while a worker has it down", ["source"],
                               multiprocess_mode="livemin", registry=r)
        self.account_wait = Gauge("mta_account_queue_wait_seconds",
                                  "Seconds until the last turn handed out at an account's pace "
                                  "([[accounts]] max_rate): its queue's wait", ["account"],
                                  multiprocess_mode="livemax", registry=r)
        self.account_waits = Histogram("mta_account_pace_wait_seconds",
                                       "Wait of each message for its turn at its account's "
                                       "pace", ["account"], buckets=PACE_BUCKETS, registry=r)
        self._seen: dict[str, float] = {}
        self._providers_open: set[str] = set()
        self.throughput: Ring | None = None  # its throughput ring (start_metrics)
        self._init_labels()

    def _init_labels(self) -> None:
        """Series that exist from the start at 0, so dashboards show 0, not "no data"."""
        for counter in self.outcomes.values():
            counter.labels(OTHER)
        for result in ("ok", "failed"):
            self.smtp_auth.labels(result)
        for result in ("signed", "unsigned"):
            self.dkim.labels(result)
        for kind in ("hard_bounce", "soft_bounce", "complaint", "unsubscribe"):
            self.feedback.labels(kind)

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        outcome = OUTCOMES.get(str(kind))
        if outcome is not None:
            self._outcome(outcome, event)
        elif kind == "Reception":
            self.received.inc()
            self.received_rcpts.inc(int(event.get("recipients") or 0))
        elif kind == "Auth" and event.get("channel", "smtp") == "smtp":  # not the API's
            self.smtp_auth.labels("ok" if event.get("ok") else "failed").inc()
        elif kind == "CampaignPaused":
            self.campaign_pauses.inc()
        feedback = feedback_kind(event)
        if feedback is not None:
            self.feedback.labels(feedback).inc()
        self._egress(event)

    def _egress(self, event: dict[str, Any]) -> None:
        """Per egress source and provider (mta.egress): outcomes; up or down."""
        found = egress_outcome(event)
        if found is not None:
            self.egress.labels(*found).inc()
        elif event.get("type") in ("SourceUp", "SourceDown"):
            self.egress_up.labels(str(event.get("source", ""))).set(
                1 if event["type"] == "SourceUp" else 0)

    def _outcome(self, outcome: str, event: dict[str, Any]) -> None:
        provider = self.providers.of([str(event.get("mx") or "")], str(event.get("domain", "")))
        self.outcomes[outcome].labels(provider).inc()
        if outcome == "delivered" and isinstance(event.get("age"), int | float):
            self.latency.labels(provider).observe(max(0.0, float(event["age"])))

    # --- sampled figures -----------------------------------------------------------------

    def sample(self, ctx: WorkerContext, live: LiveParts) -> None:
        """Live figures of one worker: connections, in-flight, DKIM, commits."""
        if live.deliverer is not None:
            self.set_connections(pool_connections(live.deliverer, self.providers))
            tls = getattr(live.deliverer, "tls", None)
            if tls is not None:
                for (policy, result), total in list(tls.checker.sessions.counts.items()):
                    self._advance(f"tls:{policy}:{result}", total,
                                  self.tls_sessions.labels(policy, result))
        if live.scheduler is not None:
            self.in_flight.set(len(live.scheduler.in_flight))
            if live.scheduler.pace is not None:
                self.sample_paces(live.scheduler.pace)
            if live.scheduler.intake_first is not None:
                self._advance("intake_yields", live.scheduler.intake_first.yields,
                              self.intake_yields)
        if live.signer is not None:
            self._advance("signed", live.signer.signed, self.dkim.labels("signed"))
            self._advance("unsigned", live.signer.unsigned, self.dkim.labels("unsigned"))
        if live.guard is not None:
            for action, total in live.guard.metrics().items():
                self._advance(f"policy:{action}", total, self.policy_actions.labels(action))
        self._advance("commits", ctx.committer.commits, self.commits)
        self._advance("operations", ctx.committer.operations, self.commit_ops)
        if live.link is not None:
            self.cluster_up.labels(str(ctx.index)).set(1 if live.link.up else 0)
            self._advance("cluster_outages", live.link.outages, self.cluster_outages)

    def sample_paces(self, paces: Any) -> None:
        """Accounts' queue waits (mta.throttle.account_pace.AccountPaces)."""
        for account, wait in paces.take_observed():
            self.account_waits.labels(account).observe(wait)
        for account, wait in paces.queue_wait().items():
            self.account_wait.labels(account).set(wait)

    def set_connections(self, by_provider: dict[str, int]) -> None:
        for provider in self._providers_open - by_provider.keys():
            self.connections.labels(provider).set(0)
        for provider, count in by_provider.items():
            self.connections.labels(provider).set(count)
        self._providers_open |= by_provider.keys()

    def _advance(self, name: str, total: float, counter: Any) -> None:
        """Turn a plain running total kept by another part into counter increments."""
        delta = total - self._seen.get(name, 0.0)
        if delta > 0:
            counter.inc(delta)
        self._seen[name] = total


def pool_connections(deliverer: Any, providers: ProviderNames) -> dict[str, int]:
    """Connection workers (open or opening connections) of the delivery pools, by provider."""
    counts: dict[str, int] = {}
    for pool in list(deliverer.pools.values()):
        if pool.workers:
            name = providers.of([t.host for t in pool.targets])
            counts[name] = counts.get(name, 0) + pool.workers
    return counts


async def _sample_forever(metrics: EngineMetrics, ctx: WorkerContext, live: LiveParts,
                          interval: float) -> None:
    while True:
        try:
            metrics.sample(ctx, live)
        except Exception:  # a half-built worker must not stop the sampling
            log.debug("metrics sampling failed", exc_info=True)
        await asyncio.sleep(interval)


class LinkState(Protocol):
    """A link to the state other nodes share (mta.cluster.link.RedisLink)."""

    up: bool
    outages: int


@dataclass
class LiveParts:
    """The parts of a worker whose live figures are sampled (those it runs)."""

    deliverer: Deliverer | None = None
    scheduler: Scheduler | None = None
    signer: DkimSigner | None = None
    guard: PolicyGuard | None = None
    link: LinkState | None = None


def start_metrics(ctx: WorkerContext, live: LiveParts) -> EngineMetrics:
    """Record a worker's metrics: attach the event listeners (metrics, the throughput
    ring) and start the sampler."""
    cfg = ctx.cfg
    metrics = EngineMetrics(load_provider_names(cfg, None))
    metrics.throughput = ring_for_process(os.environ.get(MULTIPROC_ENV))
    ctx.listen(metrics.on_event)
    ctx.listen(metrics.throughput.on_event)
    task = asyncio.get_running_loop().create_task(
        _sample_forever(metrics, ctx, live, cfg.http.sample_interval))

    async def close() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if metrics.throughput is not None:
            metrics.throughput.close()

    ctx.on_close(close)
    return metrics




# --- reading the figures back (dashboard) ------------------------------------------------

def collect_families(local: CollectorRegistry | None) -> Iterable[Any]:
    """Every process's metric families (or this process's, without multiprocess mode)."""
    if multiprocess_enabled():
        return MultiProcessCollector(None).collect()
    return local.collect() if local is not None else []


def throughput_history(local: Ring | None, now: float) -> dict[str, Any]:
    """Every worker's throughput rings added up (mta.throughput), or `local` alone."""
    directory = os.environ.get(MULTIPROC_ENV) if multiprocess_enabled() else None
    return history(directory, local, now)


def account_waits(local: CollectorRegistry | None) -> dict[str, float]:
    """Per paced account, its queue's wait in seconds (the largest of the workers')."""
    waits: dict[str, float] = {}
    for family in collect_families(local):
        if family.name == "mta_account_queue_wait_seconds":
            for sample in family.samples:
                account = sample.labels.get("account", "")
                waits[account] = max(waits.get(account, 0.0), round(sample.value, 3))
    return waits


def outcome_totals(local: CollectorRegistry | None) -> dict[str, float]:
    """Engine-wide totals: received, delivered, deferred, bounced, expired."""
    totals = dict.fromkeys(("received", *OUTCOMES.values()), 0.0)
    for family in collect_families(local):
        name = family.name.removeprefix("mta_messages_")
        if family.name.startswith("mta_messages_") and name in totals:
            totals[name] = sum(s.value for s in family.samples if s.name.endswith("_total"))
    return totals
