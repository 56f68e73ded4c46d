"""Wires the parts together and runs them: one supervisor, N worker processes.

Each worker runs one uvloop event loop with its own SMTP listener on the shared
address (SO_REUSEPORT, so the kernel spreads connections over the workers),
its own handle on the LMDB spool (opened after fork, never before) and the
delivery of its share of the destinations (partitioned by domain hash, so a
destination's limits are held by exactly one process).

This is the one place where a worker is assembled (`Worker.run`), in the order mail
flows: intake checks (the policy guard; SMTP and the injection API alike) -> spool (group commit) -> scheduler -> hold
check (the guard's holds) -> transforms (policy headers and footer, VERP, line
breaking, DKIM) -> delivery -> outcomes -> events (log, metrics, the guard's counts).
No part reaches into another to rewire it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import signal
import socket
import ssl
import sys
import time
from dataclasses import dataclass
from typing import Any

import uvloop

from mta.cluster import check_cluster, connect_cluster
from mta.cluster.engagement import EngagementSync
from mta.cluster.link import RedisLink
from mta.cluster.policy import PolicySync
from mta.cluster.throttle import ClusterThrottle
from mta.cluster.warmup import RedisRampStore
from mta.config import Config, ConfigError, StartupError, check_bindable, parse_hostport
from mta.context import Role, Seat, WorkerContext, seats
from mta.delivery.deliverer import Deliverer, Transform
from mta.delivery.inbound import InboundHandler, verp_secret, verp_transform
from mta.delivery.service import (
    bounce_domains,
    check_delivery_config,
    dkim_transform,
    emit_outcomes,
    keep_throttle_snapshots,
    line_wrap_transform,
    make_dsn_builder,
    make_resolver,
    make_throttle,
    record_outcome_events,
)
from mta.delivery.tls.worker import check_tls_config, start_tls
from mta.dkim.signer import DkimSigner
from mta.egress.counters import source_noter
from mta.egress.service import check_sources_bindable, start_egress
from mta.egress.warmup_gate import make_source_gate
from mta.events import EventLog
from mta.http import check_http, start_operators
from mta.http.guard_operations import GuardOperations
from mta.inject.server import check_inject, start_inject
from mta.listen_lock import claim_address
from mta.metrics import LiveParts
from mta.outbox.wiring import start_outbox
from mta.policy import PolicyGuard, check_policy
from mta.queue.commit import GroupCommitter
from mta.queue.intake_first import IntakeFirst, LoopBusy
from mta.queue.rules import RateCache, RuleCheck, RuleExpiry
from mta.queue.schedule import windows_of
from mta.queue.scheduler import Scheduler, chain_recorders
from mta.queue.spool import Spool
from mta.smtp.intake import Intake
from mta.smtp.server import IntakeSMTP
from mta.throttle import Throttle
from mta.throttle.account_pace import AccountPaces, parse_rate
from mta.throttle.shared import LocalBudget, SharedBudget
from mta.tracking.hits import tracking_secret
from mta.tracking.rewrite import TrackingTransform

log = logging.getLogger("mta.engine")

SHUTDOWN_GRACE = 10.0
# A worker frees nearly everything it allocates by reference counting; with the default
# (700, 10, 10) its collector ran about 200 times a run of 10,000 messages for 5 % of the
# worker's CPU (bench/RESULTS.md, issue 21, tenth session). 20,000 net allocations
# between young collections bounds what cyclic garbage waits to a few MiB.
GC_THRESHOLDS = (20_000, 50, 100)


def worker_count(cfg: Config, requested: int | None) -> int:
    n = requested if requested else cfg.engine.workers
    return n if n > 0 else (os.cpu_count() or 1)


def tls_context(cfg: Config) -> ssl.SSLContext | None:
    if not cfg.smtp.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cfg.smtp.tls_cert, cfg.smtp.tls_key or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"[smtp] tls_cert/tls_key cannot be loaded: {exc}") from None
    return ctx


def check_startup(cfg: Config) -> socket.socket:
    """Everything that can fail at start fails here, with one line, before any fork.
    Returns the claim on the SMTP address (one engine per address): keep it open."""
    claim = claim_address("[smtp] listen", cfg.smtp.listen)
    tls_context(cfg)
    check_delivery_config(cfg)
    check_tls_config(cfg)
    check_http(cfg)
    check_inject(cfg)
    check_policy(cfg)
    check_cluster(cfg)
    check_sources_bindable(cfg)  # every [[egress.sources]] address is this machine's
    check_bindable("[smtp] listen", cfg.smtp.listen)  # no other program listens there
    return claim


@dataclass
class Delivery:
    scheduler: Scheduler
    deliverer: Deliverer
    signer: DkimSigner


class Worker:
    """Everything one process runs, assembled in `run` in the order mail flows."""

    def __init__(self, cfg: Config, seat: Seat) -> None:
        self.cfg = cfg
        self.seat = seat
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        ctx = self.open_context()
        if self.seat.role is Role.DELIVER and self.cfg.engine.delivery_priority == "idle":
            run_loop_when_idle()  # the spool's writer, started above, keeps its priority
        ctx.outbox = start_outbox(ctx)  # events for webhooks and AMQP, when configured
        link = await connect_cluster(ctx)  # Redis shared by several nodes, when configured
        guard = await start_guard(ctx, link)  # the sending contract, when enabled
        delivery = (await start_delivery(ctx, guard, link)
                    if self.cfg.delivery.enabled and self.seat.delivers else None)
        intake = await self.start_intake(ctx, guard, delivery) if self.seat.accepts else None
        live = LiveParts(delivery.deliverer if delivery else None,
                         delivery.scheduler if delivery else None,
                         delivery.signer if delivery else None, guard, link)
        await start_operators(ctx, GuardOperations(guard) if guard else None, live,
                              await share_engagement(ctx, link))
        server = await self.listen(intake) if intake else None
        self.stop_on_signals()
        log.info("worker %d/%d %s", self.seat.index, self.seat.workers, self.seat.role.value)
        settle_garbage_collector()
        await self.stopping.wait()
        in_flight = len(delivery.scheduler.in_flight) if delivery else 0
        log.info("worker %d stopping: %d deliveries in flight (they go out again after a "
                 "restart if they were cut off)", self.seat.index, in_flight)
        await self.shutdown(ctx, server)
        log.info("worker %d stopped; spool closed cleanly", self.seat.index)

    async def start_intake(self, ctx: WorkerContext, guard: PolicyGuard | None,
                           delivery: Delivery | None) -> Intake:
        intake = Intake(self.cfg, ctx.spool, ctx.committer, policy=guard, emit=ctx.emit,
                        on_stored=delivery.scheduler.notify_stored if delivery else None,
                        record_events=ctx.outbox.record if ctx.outbox else None)
        ctx.on_close(intake.close)
        await start_inject(ctx, intake)  # the HTTP injection API: the same intake, per worker
        return intake

    def open_context(self) -> WorkerContext:
        cfg = self.cfg
        spool = Spool(cfg.spool.path, cfg.spool.map_size)
        events = EventLog(cfg.engine.event_log)
        events.start()
        committer = GroupCommitter(spool, cfg.spool.max_batch)
        committer.start()
        return WorkerContext(cfg, self.seat, spool, committer, events)

    async def listen(self, intake: Intake) -> asyncio.Server:
        cfg = self.cfg
        host, port = parse_hostport(cfg.smtp.listen)
        tls = tls_context(cfg)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: IntakeSMTP(intake, tls), host, port, reuse_port=True, backlog=4096)
        log.info("worker %d/%d listening on %s", self.seat.index, self.seat.workers, cfg.smtp.listen)
        return server

    def stop_on_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)

    async def shutdown(self, ctx: WorkerContext, server: asyncio.Server | None) -> None:
        if server is not None:
            server.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), SHUTDOWN_GRACE)
        for close in reversed(ctx.closers):
            await close()
        await ctx.committer.close()
        ctx.events.close()
        ctx.spool.close()


async def start_guard(ctx: WorkerContext, link: RedisLink | None) -> PolicyGuard | None:
    """The policy guard: intake checks, holds, the message transform, counting."""
    cfg = ctx.cfg
    if not cfg.policy.enabled:
        return None
    guard = PolicyGuard(cfg, ctx.spool, ctx.committer, emit=ctx.emit,
                        record_events=ctx.outbox.record if ctx.outbox else None)
    await guard.start(daily_purge=ctx.seat.leader)
    ctx.listen(guard.on_event)
    ctx.on_close(guard.close)
    if link is not None:  # several nodes: share pauses, counters and limits through Redis
        sync = PolicySync(guard, link, leader=ctx.seat.leader)
        guard.share(sync)
        await sync.start()
        ctx.on_close(sync.close)  # closed before the guard's final flush
    return guard


async def share_engagement(ctx: WorkerContext, link: RedisLink | None
                           ) -> EngagementSync | None:
    """Several nodes: the opens and clicks this node serves (worker 0, with the HTTP
    listener) are added to the cluster's counters in Redis, the admin views show those."""
    if link is None or not ctx.seat.leader or not ctx.cfg.http.enabled:
        return None
    sync = EngagementSync(link, ctx.spool, ctx.committer.submit)
    await sync.start()
    ctx.listen(sync.on_event)  # a purged account leaves Redis too
    ctx.on_close(sync.close)  # closed after the tracker's last batch (closers run reversed)
    return sync


def account_paces(ctx: WorkerContext, budget: SharedBudget) -> AccountPaces:
    """`[[accounts]] max_rate`: one pace per account, shared across nodes by `budget`."""
    rates = {a.name: parse_rate(a.max_rate) for a in ctx.cfg.accounts if a.max_rate}
    return AccountPaces(rates, budget, ctx.seat.sharers, on_wait=lambda account, wait: ctx.emit(
        {"type": "AccountPaced", "account": account, "queue_wait": wait}),
        campaign_rates=RateCache(ctx.spool).get)


def shared_budget(ctx: WorkerContext, link: RedisLink | None, throttle: Throttle
                  ) -> SharedBudget:
    if link is None:
        return LocalBudget()
    budget = ClusterThrottle(link, throttle, ctx.seat.sharers)
    budget.start()
    ctx.on_close(budget.close)
    return budget


async def start_delivery(ctx: WorkerContext, guard: PolicyGuard | None,
                         link: RedisLink | None) -> Delivery:
    """The path of a queued message, in order: the scheduler finds it due, the hold check
    keeps a paused campaign's mail, the transforms rewrite it, delivery sends it (or the
    inbound handler takes mail for our own domains), its outcome is recorded and emitted."""
    cfg = ctx.cfg
    local_domains = bounce_domains(cfg) | {d.lower() for d in cfg.smtp.local_domains}
    throttle = make_throttle(ctx, shared=link is not None)
    budget = shared_budget(ctx, link, throttle)
    rules = RuleCheck(ctx.spool, then=guard.holds if guard else None)  # operators' rules
    scheduler = Scheduler(ctx.spool, ctx.committer, cfg.delivery, ctx.seat.share, ctx.seat.sharers,
                          on_outcome=emit_outcomes(ctx, local_domains),
                          build_dsn=make_dsn_builder(cfg),
                          hold_check=rules, windows=windows_of(cfg),
                          bounce_check=rules, pace=account_paces(ctx, budget),
                          record_events=chain_recorders(
                              record_outcome_events(ctx, local_domains),
                              source_noter(ctx.spool) if cfg.egress.sources else None),
                          intake_first=intake_first(ctx))
    if ctx.seat.delivery_leader:  # one worker lifts expired rules
        expiry = RuleExpiry(ctx.spool, ctx.committer.submit, ctx.emit)
        expiry.start()
        ctx.on_close(expiry.close)
    verp_key = verp_secret(cfg, ctx.spool)
    signer = DkimSigner.from_config(cfg.dkim)  # without keys: counts what goes out unsigned
    transforms: list[Transform] = [
        *([guard.transform] if guard and guard.transform else []),  # footer, List-Unsubscribe
        TrackingTransform(cfg, tracking_secret(cfg, ctx.spool)),  # links, pixel
        *([verp_transform(cfg, verp_key)] if cfg.bounce.verp else []),  # the return path
        *([line_wrap_transform(cfg.delivery.line_length_limit)]
          if cfg.delivery.line_length_limit else []),
        dkim_transform(signer),  # last: signs what is sent
    ]
    mailboxes = {cfg.policy.unsubscribe_mailbox.lower(): guard.unsubscribe_mailbox} if guard else {}
    inbound = InboundHandler(cfg, ctx.spool, ctx.emit, scheduler.complete, verp_key, mailboxes)
    resolver = make_resolver(cfg)
    tls = start_tls(ctx, resolver.lookup,  # TLS modes, MTA-STS, DANE, TLS reports
                    on_stored=lambda _: scheduler.wake())
    ramps = RedisRampStore(link) if link is not None else None  # warm-up caps of the cluster
    egress = start_egress(ctx, rules, make_source_gate(ctx, ramps))  # sources and pools
    deliverer = Deliverer(cfg, resolver, throttle, budget,
                          scheduler, transforms, local_domains, inbound, tls=tls.policies,
                          egress=egress)
    scheduler.start(dispatch=deliverer.dispatch)
    keep_throttle_snapshots(ctx, throttle)

    async def close() -> None:
        await scheduler.stop()
        await deliverer.close()

    ctx.on_close(close)
    return Delivery(scheduler, deliverer, signer)


def intake_first(ctx: WorkerContext) -> IntakeFirst | None:
    """Bulk delivery's yield to a busy intake on the same loop, reading the loop's
    business (None: off, or a worker that only delivers)."""
    cfg = ctx.cfg.delivery
    if cfg.yield_to_intake <= 0 or not ctx.seat.accepts:
        return None
    loop_busy = LoopBusy()
    loop_busy.start()
    ctx.on_close(loop_busy.close)
    return IntakeFirst(loop_busy, cfg.yield_to_intake, cfg.deliver_between_yields)


def settle_garbage_collector() -> None:
    """Once the worker is up: what starting it made lives as long as the worker, so the
    collector stops scanning it (`gc.freeze`), and collects young objects less often."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run_loop_when_idle() -> None:
    """A delivering worker's event loop runs under SCHED_IDLE: it gets only the CPU the
    accepting workers leave, and their wake-ups take its CPU at once. Linux sets the
    policy per thread: the calling one (the loop) and those it starts later."""
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def spread_intake(seat: Seat) -> None:
    """With workers of their own for delivery, each accepting worker stays on one CPU of
    those the engine may use, one after the other: two of them never queue on one core
    while the other core runs delivery (its wake-ups would land them together)."""
    if seat.role is not Role.ACCEPT:
        return
    with contextlib.suppress(OSError, AttributeError):
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[seat.index % len(cpus)]})


def run_worker(cfg: Config, seat: Seat) -> None:
    spread_intake(seat)  # before any thread starts: they all keep the CPU
    _die_with_parent()
    _name_worker(seat)
    setup_logging(cfg)
    uvloop.run(Worker(cfg, seat).run())


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this worker when the supervisor dies (kill -9 included)."""
    _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _name_worker(seat: Seat) -> None:
    """top and ps (comm) show what each worker does: mta-intake-0, mta-delivery-2, mta-worker-1."""
    kind = {Role.ACCEPT: "intake", Role.DELIVER: "delivery"}.get(seat.role, "worker")
    _prctl(15, f"mta-{kind}-{seat.index}".encode()[:15])  # PR_SET_NAME


def _prctl(option: int, arg: int | bytes) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, arg)


def setup_logging(cfg: Config) -> None:
    logging.basicConfig(
        level=getattr(logging, cfg.engine.log_level.upper()),
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def serve(cfg: Config, workers: int | None = None) -> int:
    """The supervisor: starts the workers, restarts one that dies, stops them all on TERM."""
    claim = check_startup(cfg)
    setup_logging(cfg)
    from mta.metrics import cleanup_metrics_dir, metrics_process_dead, prepare_metrics_dir

    metrics_dir = prepare_metrics_dir(cfg)
    n = worker_count(cfg, workers)
    places = seats(n, cfg.engine.delivery_workers if cfg.delivery.enabled else 0)
    children: dict[int, Seat] = {}  # pid -> its worker's seat
    stopping = False
    exit_code = 0

    def spawn(seat: Seat) -> None:
        pid = os.fork()
        if pid == 0:
            # The supervisor's handlers must not run here: until the worker's loop has its
            # own, a stop request ends the worker at once (it has accepted nothing yet).
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            claim.close()  # the supervisor's; it goes when the supervisor goes
            code = 0
            try:
                run_worker(cfg, seat)
            except ConfigError as exc:
                print(f"mta: config error: {exc}", file=sys.stderr)
                code = 2
            except StartupError as exc:
                print(f"mta: {exc}", file=sys.stderr)
                code = 2
            except BaseException:
                logging.getLogger("mta.engine").exception("worker %d failed", seat.index)
                code = 1
            os._exit(code)
        children[pid] = seat

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for seat in places:
        spawn(seat)
    log.info("engine started: %d workers, SMTP on %s", len(places), cfg.smtp.listen)
    restarts: list[float] = []
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        seat = children.pop(pid, None)
        metrics_process_dead(pid)  # a dead worker's live gauges stop counting
        if seat is None or stopping:
            continue
        code = os.waitstatus_to_exitcode(status)
        if code == 2:  # a configuration problem: restarting would fail the same way
            exit_code = 2
            stop(signal.SIGTERM, None)
            continue
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < 60] + [now]
        if len(restarts) > 10:
            log.error("workers keep dying; stopping the engine")
            exit_code = 1
            stop(signal.SIGTERM, None)
            continue
        log.warning("worker %d (pid %d) exited with %s; restarting", seat.index, pid, code)
        spawn(seat)
    cleanup_metrics_dir(cfg, metrics_dir)
    claim.close()
    log.info("engine stopped")
    return exit_code
