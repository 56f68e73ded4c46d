"""Outbound delivery: routes each due job to a connection pool per destination.

A destination is the resolved MX set of a domain, so domains hosted on the
same servers share connections. Each pool runs up to a maximum of connection
workers; a worker keeps its connection open for many messages (up to a
maximum per connection) and closes it after an idle timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from mta.config import Config
from mta.delivery.client import ConnectFailure, Connection, ConnectSettings, Target, connect
from mta.delivery.mx import Route, RouteError
from mta.queue.outcome import RcptResult, all_recipients
from mta.queue.scheduler import Item, Scheduler

log = logging.getLogger("mta.delivery")

# Crash tests set MTA_FAILPOINT to kill the engine at a chosen point (see tests/test_crash.py).
FAILPOINT = os.environ.get("MTA_FAILPOINT", "")


class Resolver(Protocol):
    async def route(self, domain: str) -> Route | RouteError: ...


# A transform rewrites what is sent for an item: (item, sender, data) -> (sender, data).
Transform = Callable[[Item, str, bytes], tuple[str, bytes]]


@dataclass
class Pool:
    key: tuple[str, ...]
    targets: list[Target]
    queue: deque[Item] = field(default_factory=deque)
    workers: int = 0
    idle: int = 0
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)


class Deliverer:
    def __init__(self, cfg: Config, resolver: Resolver, scheduler: Scheduler | None = None
                 ) -> None:
        self.cfg = cfg
        self.resolver = resolver
        self.scheduler: Scheduler | None = scheduler
        self.pools: dict[tuple[str, ...], Pool] = {}
        self.transforms: list[Transform] = []
        self.local_handler: Callable[[Item], Any] | None = None
        self.local_domains: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.open_connections = 0
        d = cfg.delivery
        self._settings = ConnectSettings(
            port=d.port, helo=d.helo_name or cfg.engine.hostname,
            connect_timeout=d.connect_timeout, command_timeout=d.command_timeout,
            source_address=d.source_address)
        self._tls_required = {name.lower() for name, policy in d.domains.items()
                              if policy.tls == "required"}

    # --- entry point from the scheduler ----------------------------------------

    def dispatch(self, item: Item) -> None:
        self._spawn(self._route(item))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _route(self, item: Item) -> None:
        if item.domain in self.local_domains and self.local_handler is not None:
            await self.local_handler(item)
            return
        route = await self.resolver.route(item.domain)
        error = route_error(route)
        if error is not None:
            code, status, text = error
            await self._complete(item, [RcptResult(r, code, text, status)
                                        for r in all_recipients(item.job)])
            return
        targets = route_targets(route)
        key = tuple(t.address for t in targets)
        if item.domain in self._tls_required:
            key = ("tls",) + key
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = Pool(key, targets)
        pool.queue.append(item)
        if pool.idle:
            pool.wakeup.set()
        elif pool.workers < self.cfg.delivery.max_connections_per_destination:
            pool.workers += 1
            self._spawn(self._connection_worker(pool, item.domain in self._tls_required))

    async def _complete(self, item: Item, results: list[RcptResult]) -> None:
        assert self.scheduler is not None
        await self.scheduler.complete(item, results)

    # --- connections --------------------------------------------------------

    async def _next_item(self, pool: Pool) -> Item | None:
        deadline = time.monotonic() + self.cfg.delivery.connection_idle_timeout
        while not pool.queue:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            pool.idle += 1
            pool.wakeup.clear()
            try:
                async with asyncio.timeout(remaining):
                    await pool.wakeup.wait()
            except TimeoutError:
                return None
            finally:
                pool.idle -= 1
        return pool.queue.popleft()

    async def _connection_worker(self, pool: Pool, tls_required: bool) -> None:
        conn: Connection | None = None
        settings = self._settings
        if tls_required:
            settings = ConnectSettings(**{**settings.__dict__, "tls_required": True})
        try:
            while (item := await self._next_item(pool)) is not None:
                if conn is None or not conn.usable or (
                        conn.sent >= self.cfg.delivery.max_messages_per_connection):
                    if conn is not None:
                        await self._close(conn)
                    conn, failures = await connect(pool.targets, settings)
                    if conn is None:
                        self._fail_pool(pool, item, failures)
                        return
                    self.open_connections += 1
                sender, data = self._prepare(item)
                results = await conn.send(sender, all_recipients(item.job), data)
                if FAILPOINT == "after_remote_accept" and any(r.delivered for r in results):
                    os.killpg(0, signal.SIGKILL)  # crash tests: the remote has it, we don't know
                self._spawn(self._complete(item, results))
        finally:
            pool.workers -= 1
            if conn is not None:
                await self._close(conn)
            if pool.queue and pool.workers == 0:
                pool.workers += 1
                self._spawn(self._connection_worker(pool, tls_required))

    async def _close(self, conn: Connection) -> None:
        self.open_connections -= 1
        await conn.close()

    def _fail_pool(self, pool: Pool, item: Item, failures: list[ConnectFailure]) -> None:
        """No address took a connection: this item and everything queued behind it defer."""
        items = [item, *pool.queue]
        pool.queue.clear()
        for each in items:
            self._spawn(self._complete(each, connect_results(each, failures)))

    def _prepare(self, item: Item) -> tuple[str, bytes]:
        sender, data = item.message["from"], item.message["data"]
        for transform in self.transforms:
            sender, data = transform(item, sender, data)
        return sender, data

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def connect_results(item: Item, failures: list[ConnectFailure]) -> list[RcptResult]:
    """Per-recipient results when no connection could be had."""
    last = failures[-1] if failures else None
    permanent = bool(failures) and all(500 <= f.code < 600 for f in failures)
    if last is None:
        code, text, status, host = 0, "no address to connect to", "4.4.4", ""
    else:
        code, text, status, host = last.code, last.text, last.enhanced, last.target.host
    if permanent:
        code = last.code if last else 550
    return [RcptResult(r, code, text, status, host) for r in all_recipients(item.job)]


def route_error(route: Route | RouteError) -> tuple[int, str, str] | None:
    """(reply code, enhanced status, text) when the route is an error, else None."""
    if isinstance(route, RouteError):
        return route.code, route.status, route.text
    return None


def route_targets(route: Route) -> list[Target]:
    return [Target(host.name, address) for host in route.hosts for address in host.addresses]
