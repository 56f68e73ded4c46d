"""Throttle budgets held in Redis, so a destination's limits hold across all nodes.

With `[cluster] redis` set, each worker's `Throttle` keeps a destination's whole budget
(it no longer divides it by the local worker count) and the deliverer also asks this
`ClusterThrottle`:

- ``await gate.connect(dest)`` before opening a connection: 0.0 grants a *lease* per
  scope of the destination (a member of a sorted set scored by its expiry), WAIT_FOR_CLOSE
  when the cluster already holds the scope's max_connections, else seconds to wait for
  the connection pace. One Lua script checks and takes every scope at once, so two
  workers can never both take the last lease;
- ``await gate.release(dest)`` once the connection is closed;
- ``await gate.send(dest)`` before each message: 0.0, or seconds to wait and ask again.
  The cluster-wide message pace is a GCRA on one key per scope (Lua). A caller reserves
  its turn (up to RESERVE_MAX ahead), so the workers of all nodes are served in the
  order they asked, none starves; tokens are taken in small batches (50 ms worth of the
  rate) so a fast destination costs one round trip per batch, not per message.

Leases expire after `[cluster] node_ttl` unless renewed (every third of it), so a node
that dies or loses Redis frees its connections in Redis by itself. Times are Redis's
own clock (TIME in the scripts): nodes' clocks do not matter.

While Redis is down the gate keeps conservative local limits: this worker's share of
each budget among the last known number of workers in the cluster (never more than a
single node's split), a hold-off before opening new connections (the other workers
notice the outage and close what is over their share meanwhile: `over_limit`), and no
Redis calls. When Redis is back, the leases of the connections still open are written
again before any new connection is asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any

from mta.cluster.link import DOWN, RedisLink
from mta.throttle.gcra import Gcra
from mta.throttle.throttle import WAIT_FOR_CLOSE, Budget, Destination, Throttle

log = logging.getLogger("mta.cluster")

BATCH_SECONDS = 0.05  # message tokens taken at once: this long at the rate (within the burst)
TOKEN_LIFE = 1.0  # tokens in hand not used within this long (once usable) are dropped
RESERVE_MAX = 1.0  # a message token may be reserved this far ahead

# KEYS: per scope its lease set, then its connection pace key.
# ARGV: member, lease ttl (s), then per scope: limit, connection interval (0: none), burst.
# Returns "ok" (leases taken), "full" (a scope holds its limit) or the seconds to wait.
ACQUIRE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local ttl = tonumber(ARGV[2])
local n = #KEYS / 2
local wait = 0
for i = 1, n do
  local leases, pace = KEYS[2 * i - 1], KEYS[2 * i]
  local interval, burst = tonumber(ARGV[3 * i + 1]), tonumber(ARGV[3 * i + 2])
  redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
  if redis.call('ZCARD', leases) >= tonumber(ARGV[3 * i]) then return 'full' end
  if interval > 0 then
    local tat = math.max(tonumber(redis.call('GET', pace) or '0'), now)
    wait = math.max(wait, tat + interval - interval * burst - now)
  end
end
if wait > 1e-6 then return tostring(wait) end
for i = 1, n do
  local leases, pace = KEYS[2 * i - 1], KEYS[2 * i]
  local interval = tonumber(ARGV[3 * i + 1])
  redis.call('ZADD', leases, now + ttl, ARGV[1])
  redis.call('PEXPIRE', leases, math.ceil(ttl * 1000))
  if interval > 0 then
    local tat = math.max(tonumber(redis.call('GET', pace) or '0'), now) + interval
    redis.call('SET', pace, tostring(tat), 'PX', math.ceil((tat - now) * 1000) + 1000)
  end
end
return 'ok'
"""

# KEYS: lease sets; ARGV: ttl (s), then one member per key. Writes every lease again
# (renewal, and the catch-up after an outage); returns the sets' sizes.
RENEW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local ttl = tonumber(ARGV[1])
local sizes = {}
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', key, math.ceil(ttl * 1000))
  sizes[i] = redis.call('ZCARD', key)
end
return sizes
"""

# KEYS: lease sets; ARGV: one member per key.
RELEASE_LUA = """
for i, key in ipairs(KEYS) do redis.call('ZREM', key, ARGV[i]) end
return #KEYS
"""

# KEYS: message pace keys; ARGV: quantity, longest reservation (s), then per key:
# interval, burst. Returns {1, delay}: the tokens are taken, usable after `delay` seconds
# (a reservation: the callers of all nodes are served in turn), or {0, delay}: nothing
# taken, ask again after `delay`.
PACE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local q = tonumber(ARGV[1])
local wait = 0
for i, key in ipairs(KEYS) do
  local interval, burst = tonumber(ARGV[2 * i + 1]), tonumber(ARGV[2 * i + 2])
  local tat = math.max(tonumber(redis.call('GET', key) or '0'), now)
  wait = math.max(wait, tat + interval * q - interval * burst - now)
end
if wait > tonumber(ARGV[2]) then return {0, tostring(wait)} end
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 * i + 1])
  local tat = math.max(tonumber(redis.call('GET', key) or '0'), now) + interval * q
  redis.call('SET', key, tostring(tat), 'PX', math.ceil((tat - now) * 1000) + 1000)
end
return {1, tostring(math.max(wait, 0))}
"""


@dataclass
class Tokens:
    """Message tokens taken from the cluster's pace, not used yet."""

    count: int
    usable: float  # monotonic time from which they may be used


def batch_size(budgets: list[Budget]) -> int:
    """Message tokens to take at once: BATCH_SECONDS at the slowest rate, within bursts."""
    sizes = [min(b.message_burst, int((b.message_rate or 0) * BATCH_SECONDS))
             for b in budgets]
    return max(1, min(sizes, default=1))


def local_share(total: float, cluster_workers: int) -> float:
    return total / max(1, cluster_workers)


class ClusterThrottle:
    """One worker's side of the cluster-wide budgets (see the module's docstring)."""

    def __init__(self, link: RedisLink, throttle: Throttle, local_workers: int = 1) -> None:
        self.link = link
        self.throttle = throttle
        self.local_workers = max(1, local_workers)
        self.ttl = link.cfg.node_ttl
        redis = link.redis
        self._acquire = redis.register_script(ACQUIRE_LUA)
        self._renew = redis.register_script(RENEW_LUA)
        self._release = redis.register_script(RELEASE_LUA)
        self._pace = redis.register_script(PACE_LUA)
        self._held: dict[tuple[str, ...], list[str]] = {}  # scope keys -> a lease per connection
        self._serial = itertools.count(1)
        self._tokens: dict[tuple[str, ...], Tokens] = {}  # message tokens in hand
        self._local: dict[tuple[str, str], Gcra] = {}  # paces while Redis is down
        self._lock = asyncio.Lock()  # orders renewals and releases of this worker's leases
        self._stale = not link.up  # leases to write again before asking for more
        self._down_at = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        link.on_down.append(self._went_down)
        link.on_up.append(self.catch_up)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._renew_forever())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # --- connections ----------------------------------------------------------------

    async def connect(self, dest: Destination) -> float:
        """0.0: a connection may be opened (call `release` once it is closed); else
        WAIT_FOR_CLOSE (the cluster holds the limit) or seconds to wait."""
        budgets = self.throttle.budgets(dest)
        if self._stale and self.link.up:
            await self.catch_up()
        if self.link.up:
            member = self._member()
            result = await self.link.call(lambda: self._acquire(
                keys=self._lease_keys(budgets), args=self._lease_args(member, budgets)))
            if result is not DOWN:
                return self._granted(budgets, member, result)
        return self._connect_locally(budgets)

    async def release(self, dest: Destination) -> None:
        """A connection granted by `connect` for `dest` is closed."""
        keys = tuple(b.key for b in self.throttle.budgets(dest))
        async with self._lock:
            members = self._held.get(keys)
            if not members:
                return
            member = members.pop()
            if not members:
                del self._held[keys]
            if self.link.up:
                await self.link.call(lambda: self._release(
                    keys=[self._key("leases", k) for k in keys], args=[member] * len(keys)))

    def over_limit(self, dest: Destination) -> bool:
        """While Redis is down: this worker holds more connections than its local share
        (close one after its current message)."""
        if self.link.up:
            return False
        return any(self._open(b.key) > self._local_max(b) for b in self.throttle.budgets(dest))

    def open_connections(self) -> int:
        return sum(len(members) for members in self._held.values())

    def _granted(self, budgets: list[Budget], member: str, result: Any) -> float:
        text = result.decode() if isinstance(result, bytes) else str(result)
        if text == "ok":
            self._hold(budgets, member)
            return 0.0
        return WAIT_FOR_CLOSE if text == "full" else max(float(text), 0.001)

    def _connect_locally(self, budgets: list[Budget]) -> float:
        holdoff = self._holdoff()
        if holdoff > 0:
            return holdoff
        if any(self._open(b.key) >= self._local_max(b) for b in budgets):
            return WAIT_FOR_CLOSE
        paces = [(self._local_gcra("conn", b.key, b.connection_rate, 1))
                 for b in budgets if b.connection_rate]
        now = time.monotonic()
        wait = max((g.wait(now) for g in paces), default=0.0)
        if wait:
            return wait
        for gcra in paces:
            gcra.take(now)
        self._hold(budgets, self._member())
        return 0.0

    def _holdoff(self) -> float:
        """New connections wait this long after Redis went down: the other workers notice
        too (at their next call or keep-alive) and close what is over their share."""
        interval = min(self.link.cfg.retry_interval, self.link.cfg.node_ttl / 3)
        return max(0.0, self._down_at + interval + self.link.cfg.timeout - time.monotonic())

    def _local_max(self, budget: Budget) -> int:
        return max(1, budget.max_connections // self._cluster_workers())

    def _cluster_workers(self) -> int:
        return max(self.link.live_workers, self.local_workers)

    def _open(self, scope: str) -> int:
        return sum(len(members) for keys, members in self._held.items() if scope in keys)

    def _hold(self, budgets: list[Budget], member: str) -> None:
        self._held.setdefault(tuple(b.key for b in budgets), []).append(member)

    def _member(self) -> str:
        return f"{self.link.member}#{next(self._serial)}"

    def _key(self, kind: str, scope: str) -> str:
        return self.link.key("throttle", kind, scope)

    def _lease_keys(self, budgets: list[Budget]) -> list[str]:
        return [key for b in budgets
                for key in (self._key("leases", b.key), self._key("conn", b.key))]

    def _lease_args(self, member: str, budgets: list[Budget]) -> list[Any]:
        args: list[Any] = [member, self.ttl]
        for b in budgets:
            args += [b.max_connections, 1.0 / b.connection_rate if b.connection_rate else 0, 1]
        return args

    # --- messages -------------------------------------------------------------------

    async def send(self, dest: Destination) -> float:
        """0.0: send the next message to `dest` now; else the seconds to wait."""
        budgets = [b for b in self.throttle.budgets(dest) if b.message_rate]
        if not budgets:
            return 0.0
        keys = tuple(b.key for b in budgets)
        wait = self._token_in_hand(keys)
        if wait is not None:
            return wait
        if self.link.up:
            quantity = batch_size(budgets)
            result = await self.link.call(lambda: self._pace(
                keys=[self._key("pace", k) for k in keys], args=self._pace_args(quantity, budgets)))
            if result is not DOWN:
                return self._reserved(keys, quantity, result)
        return self._send_locally(budgets)

    def _token_in_hand(self, keys: tuple[str, ...]) -> float | None:
        """0.0: a token was taken; > 0: tokens are reserved, usable after that wait;
        None: no tokens (ask Redis)."""
        tokens = self._tokens.get(keys)
        if tokens is None:
            return None
        now = time.monotonic()
        if tokens.count <= 0 or now > tokens.usable + TOKEN_LIFE:
            del self._tokens[keys]
            return None
        if now < tokens.usable:
            return tokens.usable - now
        tokens.count -= 1
        return 0.0

    def _reserved(self, keys: tuple[str, ...], quantity: int, result: Any) -> float:
        taken, delay = int(result[0]), float(result[1])
        if not taken:
            return max(delay, 0.001)
        if delay <= 0:
            quantity -= 1  # one is used now
        if quantity:
            self._tokens[keys] = Tokens(quantity, time.monotonic() + delay)
        return delay

    @staticmethod
    def _pace_args(quantity: int, budgets: list[Budget]) -> list[Any]:
        args: list[Any] = [quantity, RESERVE_MAX]
        for b in budgets:
            args += [1.0 / (b.message_rate or 1.0), b.message_burst]
        return args

    def _send_locally(self, budgets: list[Budget]) -> float:
        paces = [self._local_gcra("msg", b.key, b.message_rate, b.message_burst)
                 for b in budgets if b.message_rate]
        now = time.monotonic()
        wait = max((g.wait(now) for g in paces), default=0.0)
        if wait:
            return wait
        for gcra in paces:
            gcra.take(now)
        return 0.0

    def _local_gcra(self, kind: str, scope: str, rate: float, burst: int) -> Gcra:
        share = local_share(rate, self._cluster_workers())
        burst = max(1, burst // self._cluster_workers())
        gcra = self._local.get((kind, scope))
        if gcra is None:
            gcra = self._local[(kind, scope)] = Gcra(share, burst)
        else:
            gcra.set_rate(share, burst)
        return gcra

    # --- Redis's state ----------------------------------------------------------------

    def _went_down(self) -> None:
        self._stale = True
        self._down_at = time.monotonic()
        self._tokens.clear()

    async def catch_up(self) -> None:
        """Redis is back: write the leases of the connections open now again."""
        await self._write_leases()
        self._stale = not self.link.up

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            if self.link.up:
                await self._write_leases()

    async def _write_leases(self) -> None:
        async with self._lock:
            pairs = [(self._key("leases", k), m)
                     for keys, members in self._held.items() for m in members for k in keys]
            if pairs:
                await self.link.call(lambda: self._renew(
                    keys=[k for k, _ in pairs], args=[self.ttl, *(m for _, m in pairs)]))


def start_cluster_throttle(worker: Any, throttle: Throttle) -> ClusterThrottle | None:
    """The worker's gate to the cluster-wide budgets, or None on a single node."""
    link: RedisLink | None = getattr(worker, "cluster", None)
    if link is None:
        return None
    gate = ClusterThrottle(link, throttle, worker.workers)
    gate.start()
    worker.closers.append(gate.close)
    return gate
