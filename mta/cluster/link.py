"""One worker's link to the cluster's Redis, and whether it can be used right now.

Every shared part (throttle budgets, policy state) calls Redis through `RedisLink.call`:
a call that fails or takes longer than `[cluster] timeout` marks the link down and
returns `DOWN`, so the caller falls back to its conservative local behaviour at once
instead of waiting. While down, a background task retries every `retry_interval`;
when Redis answers again the link is up and the `on_up` callbacks run (catch-up:
re-publish what was decided locally meanwhile).

A worker that made no call while Redis was briefly away never sees a command fail (the
connection pool replaces the connections the server closed), so the probe also compares
the server's `run_id`: a new one means Redis restarted or another server took over, and
counts as an outage (the `on_down`, then the `on_up` callbacks run).

The link also registers this worker in the cluster (a sorted set scored by expiry),
so budgets can be divided by the number of live workers on all nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from mta.config import ClusterConfig
from mta.text import without_password

log = logging.getLogger("mta.cluster")

T = TypeVar("T")


class _Down:
    """The result of a call made while Redis is unreachable."""

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "DOWN"


DOWN: Any = _Down()


class RedisRestarted(RedisError):
    """The probe met another Redis server process (a new `run_id`) than before."""


async def stop_task(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background loop and wait for its end. Cancels again while it runs on:
    `asyncio.wait_for` (Python 3.11) can swallow a cancellation that comes just as the
    call it waits for completes, and a loop would then never end."""
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=0.2)
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s ended with %r", task.get_name(), task.exception())


class RedisLink:
    def __init__(self, cfg: ClusterConfig, member: str,
                 client: aioredis.Redis | None = None) -> None:
        self.cfg = cfg
        self.member = member  # "node/worker", unique in the cluster
        self.prefix = cfg.key_prefix
        self.where = without_password(cfg.redis)
        self.redis = client or aioredis.Redis.from_url(
            cfg.redis, socket_timeout=cfg.timeout, socket_connect_timeout=cfg.timeout,
            health_check_interval=0)
        self.up = False
        self.down_since: float | None = time.time()
        self.outages = 0  # times the link went down (a metric)
        self.on_up: list[Callable[[], Awaitable[None]]] = []
        self.on_down: list[Callable[[], None]] = []
        self.live_workers = 1  # workers registered on all nodes (last known)
        self.run_id: str | None = None  # the Redis server process last probed
        self._task: asyncio.Task[None] | None = None

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    async def start(self) -> None:
        await self._check()
        if not self.up:
            log.warning("cluster: Redis %s unreachable at start; running on local limits",
                        self.where)
        self._task = asyncio.get_running_loop().create_task(self._keep_alive())

    async def close(self) -> None:
        await stop_task(self._task)
        with contextlib.suppress(RedisError, OSError, TimeoutError):  # leave the count now
            await asyncio.wait_for(self.redis.zrem(self.key("workers"), self.member),
                                   self.cfg.timeout)
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await self.redis.aclose()

    async def call(self, make: Callable[[], Awaitable[T]]) -> T | Any:
        """`await make()` against Redis, or `DOWN` (at once while the link is down)."""
        if not self.up:
            return DOWN
        try:
            return await asyncio.wait_for(make(), self.cfg.timeout)
        except (RedisError, OSError, TimeoutError) as exc:
            self._went_down(exc)
            return DOWN

    # --- health -------------------------------------------------------------------

    async def _keep_alive(self) -> None:
        interval = min(self.cfg.retry_interval, self.cfg.node_ttl / 3)
        while True:
            await asyncio.sleep(interval)
            await self._check()

    async def _check(self) -> None:
        """Renew this worker's registration; it doubles as the health probe."""
        if not self.up:  # connections opened before an outage are dead: drop them all
            await self._drop_connections(in_use=True)
        try:
            self.live_workers, run_id = await asyncio.wait_for(self._probe(), self.cfg.timeout)
        except (RedisError, OSError, TimeoutError) as exc:
            self._went_down(exc)
            return
        if self.up and self.run_id and run_id and run_id != self.run_id:
            self._went_down(RedisRestarted())
            await self._drop_connections(in_use=False)  # idle ones may predate the restart
        self.run_id = run_id or self.run_id
        if not self.up:
            await self._came_up()

    async def _drop_connections(self, in_use: bool) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.redis.connection_pool.disconnect(inuse_connections=in_use)

    async def _probe(self) -> tuple[int, str | None]:
        return await self._register(), await self._run_id()

    async def _register(self) -> int:
        now = time.time()
        workers = self.key("workers")
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(workers, {self.member: now + self.cfg.node_ttl})
            pipe.zremrangebyscore(workers, "-inf", now)
            pipe.zcard(workers)
            result = await pipe.execute()
        return max(1, int(result[-1]))

    async def _run_id(self) -> str | None:
        """The server process's id; None where INFO is not allowed (no restart check)."""
        try:
            info = await self.redis.info("server")
        except ResponseError:
            return None
        run_id = info.get("run_id")
        return str(run_id) if run_id else None

    def _went_down(self, exc: BaseException) -> None:
        if not self.up:
            return
        self.up = False
        self.down_since = time.time()
        self.outages += 1
        what = ("restarted" if isinstance(exc, RedisRestarted)
                else f"unreachable ({exc.__class__.__name__})")
        log.warning("cluster: Redis %s %s; running on local limits", self.where, what)
        for callback in self.on_down:
            callback()

    async def _came_up(self) -> None:
        self.up = True
        if self.down_since is not None and self.outages:
            log.warning("cluster: Redis %s reachable again after %.1f s; catching up",
                        self.where, time.time() - self.down_since)
        self.down_since = None
        for callback in self.on_up:
            try:
                await callback()
            except (RedisError, OSError, TimeoutError) as exc:
                self._went_down(exc)
                return
