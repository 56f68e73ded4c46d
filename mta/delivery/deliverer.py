"""Outbound delivery: routes each due job to a connection pool per destination.

A pool serves one throttle destination (a provider, a domain with limits of its
own, or the site: the MX host set serving a domain) on one resolved address
set, so domains hosted on the same servers share connections and one budget.
Each pool runs connection workers up to the throttle's current connection limit; a
worker keeps its connection open for many messages (up to the limit per connection)
and closes it after an idle timeout. The throttle is asked before every connection and
every message, and told every reply; then the budget shared with other nodes
(`mta.throttle.shared`), whose lease is given back once the connection is closed. Just
before sending, the scheduler's hold check is asked again (a campaign may have been
paused while the item waited), then the transforms rewrite what is sent, in order.

Routes come from the resolver, which keeps them for their answers' TTL. A route it does
not keep (TTL 0, nothing failed) is used again without a lookup while a connection of its
pool is up, for at most ROUTE_REUSE_LIMIT since the lookup (`RouteInUse`).

TLS: each domain's plan (mta/delivery/tls: the mode, DANE, MTA-STS) says which MX hosts
may be used and what each must offer; hosts it excludes are never contacted, and a
domain whose plan leaves none is deferred (4.7.x). Pools are keyed by the plan too, so
a connection is only reused for mail whose policy it was checked against.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from mta.config import Config
from mta.delivery.connection import (
    ConnectFailure,
    Connection,
    ConnectSettings,
    Target,
    TlsRoute,
    connect,
)
from mta.delivery.mx import Route, RouteError
from mta.delivery.tls.policy import refusal
from mta.delivery.tls.service import TlsPolicies
from mta.egress.chooser import Egress, Verdict
from mta.egress.pools import Source
from mta.queue.lanes import LaneQueue
from mta.queue.outcome import RcptResult
from mta.queue.scheduler import Item, Scheduler
from mta.throttle import CONNECTION_FAILED, WAIT_FOR_CLOSE, Destination, Throttle
from mta.throttle.shared import SharedBudget
from mta.throttle.throttle import ScopeSpec

log = logging.getLogger("mta.delivery")

# Crash tests set MTA_FAILPOINT to kill the engine at a chosen point (see tests/test_crash.py).
FAILPOINT = os.environ.get("MTA_FAILPOINT", "")
SHORT_WAIT = 2.0  # a pace wait up to this long is slept through; longer ones go back to the spool
SLOT_POLL = 0.1  # how often a pool at its connection limit looks again
SLOT_PATIENCE = 60.0  # then its queued items go back to the spool for a while
HOST_FAILURE_MEMORY = 300.0  # an MX address that failed is tried after the others this long
PACE_MEMORY = 1.0  # a pool whose connections waited for the pace this lately opens no more
# Slow start: a pool opens at most this many connections at once, and opens the next one
# once one of them is up and items still wait. A burst of items then adds connections at
# the pace the receiver accepts them, not all at once (a storm of connections from one
# address is what receivers punish, and each surplus connection stays open).
OPENING_AT_ONCE = 2
# A route the resolver does not keep (answers with TTL 0, none failed) stays in use,
# without a new lookup, while a connection of its pool is up, for at most this long since
# the lookup (Postfix's smtp_connection_reuse_time_limit): mail for such a domain goes on
# over the open connections, as Postfix's smtp client finds a cached connection by the
# domain before any DNS lookup. Routes with longer-lived answers are the resolver's to keep.
ROUTE_REUSE_LIMIT = 300.0
MAX_ROUTES_IN_USE = 10_000


class Resolver(Protocol):
    async def route(self, domain: str) -> Route | RouteError: ...


# A transform rewrites what is sent for an item to some of its recipients:
# (item, recipients, sender, data) -> (sender, data).
Transform = Callable[[Item, list[str], str, bytes], tuple[str, bytes]]


class IdleWorkers:
    """A pool's idle connection workers, woken one at a time: an item for the pool wakes
    one connection, not every idle one (each would run only to find the queue empty)."""

    def __init__(self) -> None:
        self._sleeping: deque[asyncio.Future[bool]] = deque()
        self.waking = 0  # woken, not running yet: they take what is queued meanwhile

    def __len__(self) -> int:
        return len(self._sleeping)

    def any(self) -> bool:
        """Some connection is idle or about to run: it takes what is queued."""
        return bool(self._sleeping) or self.waking > 0

    async def sleep(self, seconds: float) -> None:
        """Until woken or `seconds` passed (no error either way). A plain timer, not
        asyncio.timeout (some 7 us under uvloop, and a connection may idle once a message)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._sleeping.append(future)
        timer = loop.call_later(seconds, _time_up, future)
        try:
            await future
        finally:
            timer.cancel()
            if future.done() and not future.cancelled() and future.result():
                self.waking -= 1
            else:  # timed out or cancelled: no longer a sleeper
                future.cancel()
                with contextlib.suppress(ValueError):
                    self._sleeping.remove(future)

    def wake_one(self) -> bool:
        """Wake the longest idle one; False: none was left to wake."""
        while self._sleeping:
            future = self._sleeping.popleft()
            if not future.done():  # not cancelled or timed out in the meantime
                future.set_result(True)
                self.waking += 1
                return True
        return False

    def wake_all(self) -> None:
        while self._sleeping:
            self.wake_one()


def _time_up(future: asyncio.Future[bool]) -> None:
    if not future.done():
        future.set_result(False)


@dataclass
class Pool:
    key: tuple[str, ...]
    targets: list[Target]
    dest: Destination
    tls: TlsRoute | None = None  # the destination's TLS plan and checker
    queue: LaneQueue = field(default_factory=LaneQueue)  # transactional first (mta.queue.lanes)
    workers: int = 0
    opening: int = 0  # workers started and not connected yet: each takes a queued item
    idle: IdleWorkers = field(default_factory=IdleWorkers)
    pacing: int = 0  # connections waiting for their turn at the destination's pace
    source: Source | None = None  # the egress source its connections bind (None: [delivery])
    paced_at: float = -PACE_MEMORY  # when one last had to wait (monotonic)

    @property
    def connected(self) -> bool:
        """At least one of its connections is up (started and past opening)."""
        return self.workers > self.opening

    def pace_bound(self) -> bool:
        """The destination's pace, not the connection count, limits this pool now: one
        more connection could not send sooner (it would only take a connection slot
        that the receiver may refuse)."""
        return self.pacing > 0 or time.monotonic() - self.paced_at < PACE_MEMORY


@dataclass(frozen=True)
class RouteInUse:
    route: Route
    since: float  # when it was looked up (monotonic)
    pool: Pool  # the pool its last item went to


LocalHandler = Callable[[Item], Awaitable[None]]


class Deliverer:
    def __init__(self, cfg: Config, resolver: Resolver, throttle: Throttle,
                 budget: SharedBudget, scheduler: Scheduler, transforms: list[Transform],
                 local_domains: set[str], local_handler: LocalHandler,
                 tls: TlsPolicies | None = None, egress: Egress | None = None) -> None:
        self.cfg = cfg
        self.resolver = resolver
        self.throttle = throttle
        self.budget = budget  # what other nodes share (mta.throttle.shared)
        self.scheduler = scheduler
        self.pools: dict[tuple[str, ...], Pool] = {}
        self.transforms = transforms  # in order, the last one (DKIM) just before sending
        self.local_handler = local_handler  # mail for the engine's own domains
        self.local_domains = local_domains
        self.tls = tls  # None: STARTTLS when offered, nothing checked (tools, tests)
        self.egress = egress  # sources and pools (mta.egress); None or empty: [delivery]
        budget.subscribe(self.wake_idle)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False  # set by close(): nothing new starts
        self.open_connections: dict[str, int] = {}  # per destination (provider or domain)
        self._failed_hosts: dict[str, float] = {}  # address -> until when it is tried last
        self._routes_in_use: dict[str, RouteInUse] = {}  # domain -> its route, while connected
        d = cfg.delivery
        self._settings = ConnectSettings(
            port=d.port, helo=d.helo_name or cfg.engine.hostname,
            connect_timeout=d.connect_timeout, command_timeout=d.command_timeout,
            source_address=d.source_address)

    # --- entry point from the scheduler ----------------------------------------

    def dispatch(self, item: Item) -> None:
        self._spawn(self._route(item))

    def _spawn(self, coro: Any) -> None:
        if self._closing:  # e.g. a cancelled worker's kick for its pool's queue
            coro.close()
            return
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery task failed", exc_info=task.exception())

    async def _route(self, item: Item) -> None:
        if item.domain in self.local_domains:
            await self.local_handler(item)
            return
        in_use = self._route_in_use(item.domain)
        route = in_use.route if in_use else await self.resolver.route(item.domain)
        if isinstance(route, RouteError):
            await self._complete(item, [RcptResult(r, route.code, route.text, route.status)
                                        for r in item.job.waiting()])
            return
        targets = route_targets(route)
        hosts = [h.name for h in route.hosts]
        tls: TlsRoute | None = None
        if self.tls is not None:
            try:
                plan = await self.tls.plan(item.domain, hosts, route.secure)
            except Exception as exc:  # never a downgrade: the item waits
                log.exception("TLS policy of %s", item.domain)
                await self._complete(item, [RcptResult(r, 0, f"TLS policy lookup failed: {exc}",
                                                       "4.7.0") for r in item.job.waiting()])
                return
            targets = [t for t in targets if plan.allows(t.host)]
            exclusion = refusal(plan)
            if exclusion is not None or not targets:
                await self._refuse(item, plan, exclusion)
                return
            tls = TlsRoute(plan, self.tls.checker)
        dest = self.destination(item.domain, hosts)
        if dest.provider is not None:  # an operator's rule by provider applies from here
            item.provider = dest.provider
            if self.scheduler.take_held(item) or self.scheduler.take_bounced(item):
                return
        source: Source | None = None
        if self.egress:
            source = await self._source(item, dest)
            if source is None:
                return
            dest = dest.from_source(source.name)
            targets = [t for t in targets if (":" in t.address) == source.family_v6]
            if not targets:
                await self._complete(item, [RcptResult(
                    r, 0, f"no address of {item.domain} reachable from source {source.name} "
                    f"({source.address})", "4.4.4") for r in item.job.waiting()])
                return
        key = (source.name if source else "", dest.name, tls.plan.key if tls else "",
               *(t.address for t in targets))
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = Pool(key, targets, dest, tls,
                                          LaneQueue(self.cfg.delivery.bulk_min_share),
                                          source=source)
        pool.queue.append(item)
        if route.reuse_while_connected:
            self._keep_in_use(item.domain, RouteInUse(
                route, in_use.since if in_use else time.monotonic(), pool))
        self._kick(pool)

    def _keep_in_use(self, domain: str, in_use: RouteInUse) -> None:
        if domain not in self._routes_in_use and len(self._routes_in_use) >= MAX_ROUTES_IN_USE:
            self._routes_in_use = {d: u for d, u in self._routes_in_use.items()
                                   if u.pool.connected}
            if len(self._routes_in_use) >= MAX_ROUTES_IN_USE:
                return
        self._routes_in_use[domain] = in_use

    def _route_in_use(self, domain: str) -> RouteInUse | None:
        """The domain's last route while a connection its pool opened is up (and the
        lookup is not older than ROUTE_REUSE_LIMIT); None: look it up."""
        in_use = self._routes_in_use.get(domain)
        if in_use is None:
            return None
        if in_use.pool.connected and time.monotonic() - in_use.since < ROUTE_REUSE_LIMIT:
            return in_use
        del self._routes_in_use[domain]
        return None

    async def _source(self, item: Item, dest: Destination) -> Source | None:
        """The egress source of `item` (mta.egress.chooser); None when it was held,
        bounced or postponed instead (no source may carry it now)."""
        assert self.egress is not None
        item.egress_provider = dest.provider or dest.name
        choice = await self.egress.choose(self.egress.pool_of(item.message),
                                          item.egress_provider)
        if choice.source is not None:
            item.source = choice.source.name
        if choice.verdict is Verdict.HELD and self.scheduler.take_held(item):
            return None
        if choice.verdict is Verdict.BOUNCED and self.scheduler.take_bounced(item):
            return None
        if choice.verdict is Verdict.WAIT or choice.source is None:
            log.debug("%s waits %.0f s: %s", item.job_id.decode(), choice.wait, choice.reason)
            self._postpone([item], choice.wait)
            return None
        return choice.source

    def _source_settings(self, pool: Pool) -> ConnectSettings:
        """The connection settings of the pool's source: its address and EHLO name."""
        if pool.source is None:
            return self._settings
        return ConnectSettings(**{**self._settings.__dict__, "helo": pool.source.ehlo_name,
                                  "source_address": pool.source.address})

    async def _refuse(self, item: Item, plan: Any, exclusion: Any) -> None:
        """The TLS plan leaves no MX host to use: defer, and say why."""
        if exclusion is None:
            text, status, fields = f"no MX host of {item.domain} is usable", "4.7.0", None
        else:
            assert self.tls is not None
            verdict = self.tls.checker.refused(exclusion)
            text, status, fields = exclusion.reason, exclusion.status, verdict.fields()
        await self._complete(item, [RcptResult(r, 0, text, status, tls=fields)
                                    for r in item.job.waiting()])

    def destination(self, domain: str, mx_hosts: list[str]) -> Destination:
        """The throttle destination: a provider, a domain with limits of its own, or
        else the site (the MX host set) that serves the domain, so that domains hosted
        on the same servers share connections and one budget."""
        dest = self.throttle.destination(domain, mx_hosts)
        if dest.provider is None and domain not in self.throttle.shaping.domains:
            site = "mx:" + ",".join(sorted(set(mx_hosts)))
            # Several workers may deliver to one site (for different domains): share it.
            spec = ScopeSpec("site", site, self.throttle.shaping.default, shared=True)
            dest = Destination(domain, None, (spec,))
        return dest

    def wake_idle(self) -> None:
        """Idle connections look again at their share (the cluster's fair shares moved)."""
        for pool in self.pools.values():
            pool.idle.wake_all()

    def _kick(self, pool: Pool) -> None:
        """Wake an idle connection of the pool, or start one if the throttle may allow it
        and the connections there are not already waiting for the destination's pace."""
        if pool.idle.wake_one() or pool.idle.any() or (pool.workers and pool.pace_bound()):
            return
        if pool.opening >= OPENING_AT_ONCE:
            return  # slow start: the next one once one of these is up
        if pool.workers < max(1, min(self.cfg.delivery.max_connections_per_destination,
                                     self.throttle.max_connections(pool.dest))):
            pool.workers += 1
            pool.opening += 1
            self._spawn(self._connection_worker(pool))

    async def _complete(self, item: Item, results: list[RcptResult],
                        retry_after: float | None = None) -> None:
        await self.scheduler.complete(item, results, retry_after)

    def _postpone(self, items: list[Item], seconds: float) -> None:
        for item in items:
            self._spawn(self.scheduler.postpone(item, seconds))

    # --- connections --------------------------------------------------------

    async def _next_item(self, pool: Pool, conn: Connection | None) -> Item | None:
        """The pool's next item, once there is one; None after the idle timeout, or when
        the queue is empty and the connection is not to be used again (closed then, not
        kept idle)."""
        if conn is not None and not pool.queue:
            await conn.settle()  # the last message's reply, and what it says of the pool
            if not conn.usable:
                return None
        deadline = time.monotonic() + self.cfg.delivery.connection_idle_timeout
        while not pool.queue:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            if self.budget.shed(pool.dest):
                return None  # idle, and over its share while other nodes wait: close
            await pool.idle.sleep(remaining)
        return pool.queue.popleft()

    async def _connection_worker(self, pool: Pool) -> None:
        conn: Connection | None = None
        starting = True  # counted in pool.opening until its first connection is tried
        try:
            while (item := await self._next_item(pool, conn)) is not None:
                if conn is None or not conn.usable or (
                        conn.sent >= self.throttle.messages_per_connection(pool.dest)):
                    if conn is not None:
                        await self._close(pool, conn)
                    conn = await self._open(pool, item)
                    if starting:
                        starting = False
                        pool.opening -= 1
                        if conn is not None and pool.queue and not pool.idle.any():
                            self._kick(pool)  # slow start: up, and items wait: one more
                    if conn is None:
                        return
                if not await self._paced(pool, item):
                    continue
                if self.scheduler.take_held(item):
                    continue
                if not await self._send(pool, conn, item):
                    await self._close(pool, conn)
                    conn = None
                if pool.queue and not pool.idle.any():
                    self._kick(pool)  # more connections, while they are what limits
                if self._over_limit(pool):
                    return
        finally:
            pool.workers -= 1
            if starting:
                pool.opening -= 1
            if conn is not None:
                await self._close(pool, conn)
            if pool.queue and pool.workers == 0:
                self._kick(pool)

    def _over_limit(self, pool: Pool) -> bool:
        """More connections open than the (lowered) limit: close this one."""
        return self.throttle.over_connection_limit(pool.dest) or self.budget.shed(pool.dest)

    async def _open(self, pool: Pool, item: Item) -> Connection | None:
        """A new connection for the pool, or None (the item was requeued or failed)."""
        if not await self._connection_slot(pool, item):
            return None
        settings = self._source_settings(pool)
        if pool.tls is not None:
            settings = ConnectSettings(**{**settings.__dict__, "tls": pool.tls})
        conn, failures = await connect(self._healthy_first(pool.targets), settings)
        if self.egress is not None and pool.source is not None:
            if conn is None and failures and all(f.local for f in failures):
                await self._source_failed(pool, item, failures[-1].text)
                return None
            if conn is not None:
                self.egress.connected(pool.source.name)
        now = time.monotonic()
        if len(self._failed_hosts) > 10_000:
            self._failed_hosts = {a: t for a, t in self._failed_hosts.items() if t > now}
        retry_after: float | None = None
        for failure in failures:
            self._failed_hosts[failure.target.address] = now + HOST_FAILURE_MEMORY
            if failure.policy:  # the TLS policy refused it: no sign of a busy or slow host
                continue
            decision = self.throttle.record(pool.dest, failure.code or CONNECTION_FAILED,
                                            failure.enhanced, failure.text, connecting=True)
            retry_after = (None if decision.retry_at is None
                           else max(0.0, decision.retry_at - time.time()))
        if conn is None:
            self.throttle.connection_closed(pool.dest)
            await self._release_lease(pool)
            if retry_after is not None:
                # Refused as too many or too fast (421 at the greeting, refused, reset):
                # this item is deferred but stays ready at the throttle's pace; the rest
                # of the queue waits for the next connection (after the throttle's
                # backoff). Only once the throttle gives up on the destination
                # (unreachable) does the queue take the usual retry schedule.
                self._spawn(self._complete(item, connect_results(item, failures), retry_after))
                return None
            self._fail_pool(pool, item, failures)
            return None
        name = pool.dest.name
        self.open_connections[name] = self.open_connections.get(name, 0) + 1
        return conn

    async def _source_failed(self, pool: Pool, item: Item, reason: str) -> None:
        """The pool's source address cannot be used (gone from this machine): the source
        is down for a while; this item and the pool's queue choose a source again."""
        assert self.egress is not None and pool.source is not None
        self.egress.failed(pool.source.name, reason)
        self.throttle.connection_closed(pool.dest)
        await self._release_lease(pool)
        items = [item, *pool.queue]
        pool.queue.clear()
        for each in items:
            each.source = ""
            self.dispatch(each)

    def _healthy_first(self, targets: list[Target]) -> list[Target]:
        """Addresses that failed lately go last (a stable sort keeps MX preference)."""
        now = time.monotonic()
        return sorted(targets, key=lambda t: self._failed_hosts.get(t.address, 0.0) > now)

    async def _connection_slot(self, pool: Pool, item: Item) -> bool:
        """Wait until the throttle allows a new connection for `item`; False: the item
        was left to the pool's other connections, or postponed with the pool's queue."""
        waited = 0.0
        while True:
            wait = await self._try_connect(pool)
            if wait == 0:
                return True
            if wait == WAIT_FOR_CLOSE:
                if pool.workers > 1 or waited >= SLOT_PATIENCE:
                    if pool.workers <= 1:
                        self._postpone([item, *pool.queue], SHORT_WAIT)
                        pool.queue.clear()
                    else:
                        pool.queue.appendleft(item)
                        pool.idle.wake_one()  # one went idle while this one tried
                    return False
                wait = SLOT_POLL
            elif wait > SHORT_WAIT:  # suspended, or connections refused: back to the spool
                # The item too: left in the queue, it would start a new connection
                # worker at once, and that one would find the same wait (a busy loop).
                self._postpone([item, *pool.queue], wait)
                pool.queue.clear()
                return False
            await asyncio.sleep(wait)
            waited += wait

    async def _try_connect(self, pool: Pool) -> float:
        """The throttle's answer, then the shared budget's (it spans the nodes)."""
        wait = self.throttle.try_connect(pool.dest)
        if wait == 0:
            wait = await self.budget.connect(pool.dest)
            if wait:
                self.throttle.connection_closed(pool.dest)
        return wait

    async def _paced(self, pool: Pool, item: Item) -> bool:
        """Wait for the message's turn at the destination's pace; False if postponed."""
        campaign, account = item.message.get("campaign", ""), item.message.get("account", "")

        async def local_turn() -> float:
            return self.throttle.try_send(pool.dest, None, campaign, account)

        if not await self._turn(pool, item, local_turn):
            return False
        return await self._turn(pool, item, lambda: self.budget.send(pool.dest))

    async def _turn(self, pool: Pool, item: Item, ask: Callable[[], Awaitable[float]]) -> bool:
        """Wait until `ask()` says 0 (sleeping through short waits); False if postponed."""
        while (wait := await ask()) > 0:
            if wait > SHORT_WAIT:
                self._postpone([item], wait)
                return False
            pool.pacing += 1
            pool.paced_at = time.monotonic()
            try:
                await asyncio.sleep(wait)
            finally:
                pool.pacing -= 1
        return True

    async def _send(self, pool: Pool, conn: Connection, item: Item) -> bool:
        """Hand one item to the connection; its results are taken as the replies come
        (`_finish`), while the connection goes on with the next item. False when the
        connection should not be used again."""
        pending: list[asyncio.Future[list[RcptResult]]] = []
        for recipients in envelopes(item):
            sender, data = self._prepare(item, recipients)
            pending.append(await conn.submit(sender, recipients, data))
        self._spawn(self._finish(pool, conn, item, pending))
        return conn.usable

    async def _finish(self, pool: Pool, conn: Connection, item: Item,
                      pending: list[asyncio.Future[list[RcptResult]]]) -> None:
        results = [result for future in pending for result in await future]
        if FAILPOINT == "after_remote_accept" and any(r.delivered for r in results):
            os.killpg(0, signal.SIGKILL)  # crash tests: the remote has it, we don't know
        retry_after, keep = self._learn(pool, item, results)
        if not keep:
            conn.retire()
        await self._complete(item, results, retry_after)

    def _learn(self, pool: Pool, item: Item, results: list[RcptResult]
               ) -> tuple[float | None, bool]:
        """Tell the throttle each distinct reply; (retry after, keep the connection)."""
        campaign, account = item.message.get("campaign", ""), item.message.get("account", "")
        now = time.time()
        retry_at: float | None = None
        keep = True
        for code, status, text in {(r.code, r.enhanced, r.text) for r in results}:
            decision = self.throttle.record(pool.dest, code or CONNECTION_FAILED, status, text,
                                            now, campaign, account)
            if decision.retry_at is not None:
                retry_at = max(retry_at or 0.0, decision.retry_at)
                keep = False
        return (None if retry_at is None else max(0.0, retry_at - now)), keep

    async def _close(self, pool: Pool, conn: Connection) -> None:
        name = pool.dest.name
        self.open_connections[name] = max(0, self.open_connections.get(name, 1) - 1)
        self.throttle.connection_closed(pool.dest)
        await conn.close()
        await self._release_lease(pool)

    async def _release_lease(self, pool: Pool) -> None:
        """The shared lease for a connection now closed (or never opened)."""
        await self.budget.release(pool.dest)

    def _fail_pool(self, pool: Pool, item: Item, failures: list[ConnectFailure]) -> None:
        """No address took a connection: this item and everything queued behind it defer."""
        items = [item, *pool.queue]
        pool.queue.clear()
        for each in items:
            self._spawn(self._complete(each, connect_results(each, failures)))

    def _prepare(self, item: Item, recipients: list[str]) -> tuple[str, bytes]:
        sender, data = item.message["from"], item.message["data"]
        for transform in self.transforms:
            sender, data = transform(item, recipients, sender, data)
        return sender, data

    async def close(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def envelopes(item: Item) -> list[list[str]]:
    """The transactions an item is sent in. Campaign mail goes one recipient at a time:
    each copy carries its recipient's own return path and unsubscribe link, so that a
    bounce, a complaint or an unsubscribe can name exactly one recipient."""
    waiting = item.job.waiting()
    if item.message.get("campaign") and len(waiting) > 1:
        return [[recipient] for recipient in waiting]
    return [waiting]


def connect_results(item: Item, failures: list[ConnectFailure]) -> list[RcptResult]:
    """Per-recipient results when no connection could be had."""
    if not failures:
        return [RcptResult(r, 0, "no address to connect to", "4.4.4")
                for r in item.job.waiting()]
    last = failures[-1]
    code = last.code
    if 500 <= code < 600 and not all(500 <= f.code < 600 for f in failures):
        code = 0  # one MX refused for good, another only failed: try again later
    enhanced = last.enhanced if code or last.policy else "4.4.1"
    return [RcptResult(r, code, last.text, enhanced, last.target.host, tls=last.tls)
            for r in item.job.waiting()]


def route_targets(route: Route) -> list[Target]:
    return [Target(host.name, address) for host in route.hosts for address in host.addresses]
