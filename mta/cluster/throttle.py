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
notice the outage and close what is over their share meanwhile: `shed`), and no
Redis calls. When Redis is back, the leases of the connections still open are written
again before any new connection is asked for.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mta.cluster.link import DOWN, RedisLink, stop_task
from mta.throttle.gcra import Gcra
from mta.throttle.throttle import WAIT_FOR_CLOSE, Budget, Destination, Throttle

log = logging.getLogger("mta.cluster")

BATCH_SECONDS = 0.05  # message tokens taken at once: this long at the rate (within the burst)
TOKEN_LIFE = 1.0  # tokens in hand not used within this long (once usable) are dropped
RESERVE_MAX = 1.0  # a message token may be reserved this far ahead
PACE_RESERVE_MAX = 3600.0  # an account's turn may be reserved this far ahead
WAITER_TTL = 3.0  # a worker refused a connection counts as waiting this long (at most node_ttl)
FULL_MEMORY = 0.05  # after "full", connect() answers so itself this long (no round trip)
RENEW_INTERVAL = 0.25  # leases renewed (and fair shares looked at) this often (at most ttl/3)

# Shared by the lease scripts: where worker `me` stands in one scope. A lease member is
# "WORKER#SERIAL"; a waiter is a worker refused for lack of room (until its expiry).
# Returns the leases, mine, the workers holding some, the others waiting, and my fair
# share: the limit divided among all of them (rounded up; the limit itself still holds).
STANDING_LUA = """
local function standing(leases, waiters, me, limit, now)
  redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
  redis.call('ZREMRANGEBYSCORE', waiters, '-inf', now)
  local members = redis.call('ZRANGE', leases, 0, -1)
  local seen, holders, mine = {}, 0, 0
  for _, m in ipairs(members) do
    local w = string.match(m, '^(.*)#') or m
    if w == me then mine = mine + 1 end
    if not seen[w] then seen[w] = true; holders = holders + 1 end
  end
  local waiting = 0
  for _, w in ipairs(redis.call('ZRANGE', waiters, 0, -1)) do
    if not seen[w] and w ~= me then waiting = waiting + 1 end
  end
  local parties = holders + waiting
  if mine == 0 then parties = parties + 1 end
  return #members, mine, waiting, math.ceil(limit / parties)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
"""

# KEYS: per scope its lease set, its waiters, its connection pace key.
# ARGV: member, lease ttl (s), waiter ttl (s), then per scope: limit, connection interval
# (0: none), burst. Returns "ok" (leases taken), "full" (no room for this worker: the
# limit is reached, or others wait and it holds its fair share) or the seconds to wait.
ACQUIRE_LUA = STANDING_LUA + """
local member, ttl, wait_ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local me = string.match(member, '^(.*)#') or member
local n = #KEYS / 3
local wait = 0
for i = 1, n do
  local leases, waiters, pace = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local limit = tonumber(ARGV[3 * i + 1])
  local interval, burst = tonumber(ARGV[3 * i + 2]), tonumber(ARGV[3 * i + 3])
  local held, mine, waiting, fair = standing(leases, waiters, me, limit, now)
  if held >= limit or (waiting > 0 and mine >= fair) then
    redis.call('ZADD', waiters, now + wait_ttl, me)
    redis.call('PEXPIRE', waiters, math.ceil(wait_ttl * 1000))
    return 'full'
  end
  if interval > 0 then
    local tat = math.max(tonumber(redis.call('GET', pace) or '0'), now)
    wait = math.max(wait, tat + interval - interval * burst - now)
  end
end
if wait > 1e-6 then return tostring(wait) end
for i = 1, n do
  local leases, waiters, pace = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local interval = tonumber(ARGV[3 * i + 2])
  redis.call('ZADD', leases, now + ttl, member)
  redis.call('PEXPIRE', leases, math.ceil(ttl * 1000))
  redis.call('ZREM', waiters, me)
  if interval > 0 then
    local tat = math.max(tonumber(redis.call('GET', pace) or '0'), now) + interval
    redis.call('SET', pace, tostring(tat), 'PX', math.ceil((tat - now) * 1000) + 1000)
  end
end
return 'ok'
"""

# KEYS: the lease sets of every lease held (one key per member), then per scope held:
# its lease set and its waiters. ARGV: ttl (s), worker, number of leases, the members,
# then per scope its limit. Writes every lease again (renewal, and the catch-up after an
# outage); returns per scope how many leases this worker holds over its fair share
# while others wait (0: none), so it closes that many connections.
RENEW_LUA = STANDING_LUA + """
local ttl, me, count = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
for i = 1, count do
  redis.call('ZADD', KEYS[i], now + ttl, ARGV[3 + i])
  redis.call('PEXPIRE', KEYS[i], math.ceil(ttl * 1000))
end
local excess = {}
for j = 1, (#KEYS - count) / 2 do
  local limit = tonumber(ARGV[3 + count + j])
  local held, mine, waiting, fair = standing(KEYS[count + 2 * j - 1], KEYS[count + 2 * j],
                                             me, limit, now)
  excess[j] = 0
  if waiting > 0 and mine > fair then excess[j] = mine - fair end
end
return excess
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


def take_all(paces: list[Gcra]) -> float:
    """0.0 with one event taken from every pace, or the longest wait (nothing taken)."""
    now = time.monotonic()
    wait = max((g.wait(now) for g in paces), default=0.0)
    if not wait:
        for gcra in paces:
            gcra.take(now)
    return wait


def local_share(total: float, cluster_workers: int) -> float:
    return total / max(1, cluster_workers)


class ClusterThrottle:
    """One worker's side of the cluster-wide budgets (see the module's docstring)."""

    def __init__(self, link: RedisLink, throttle: Throttle, local_workers: int = 1) -> None:
        self.link = link
        self.throttle = throttle
        self.local_workers = max(1, local_workers)
        self.ttl = link.cfg.node_ttl
        self.wait_ttl = min(self.ttl, WAITER_TTL)
        redis = link.redis
        self._acquire = redis.register_script(ACQUIRE_LUA)
        self._renew = redis.register_script(RENEW_LUA)
        self._release = redis.register_script(RELEASE_LUA)
        self._pace = redis.register_script(PACE_LUA)
        self._held: dict[tuple[str, ...], list[str]] = {}  # scope keys -> a lease per connection
        self._limits: dict[str, int] = {}  # scope -> its connection limit, as last asked
        self._excess: dict[str, int] = {}  # scope -> leases over this worker's fair share
        self._closing: dict[str, int] = {}  # scope -> connections told to close (`shed`)
        self._full_until: dict[tuple[str, ...], float] = {}  # refused: no asking until then
        self._serial = itertools.count(1)
        self._tokens: dict[tuple[str, ...], list[Tokens]] = {}  # message tokens in hand
        self._local: dict[tuple[str, str], Gcra] = {}  # paces while Redis is down
        self._lock = asyncio.Lock()  # orders renewals and releases of this worker's leases
        self._stale = not link.up  # leases to write again before asking for more
        self._down_at = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        # Called when this worker learns it holds more than its fair share (the deliverer
        # wakes its idle connections, which then close: `shed`).
        self._on_excess: list[Callable[[], None]] = []
        link.on_down.append(self._went_down)
        link.on_up.append(self.catch_up)

    def subscribe(self, on_excess: Callable[[], None]) -> None:
        self._on_excess.append(on_excess)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._renew_forever())

    async def close(self) -> None:
        await stop_task(self._task)

    # --- connections ----------------------------------------------------------------

    async def connect(self, dest: Destination) -> float:
        """0.0: a connection may be opened (call `release` once it is closed); else
        WAIT_FOR_CLOSE (the cluster holds the limit) or seconds to wait."""
        budgets = self.throttle.budgets(dest)
        keys = tuple(b.key for b in budgets)
        if time.monotonic() < self._full_until.get(keys, 0.0):
            return WAIT_FOR_CLOSE  # just refused: the deliverer asks again and again
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
            for scope in keys:
                for count in (self._excess, self._closing):
                    count[scope] = max(0, count.get(scope, 0) - 1)
            self._full_until = {k: t for k, t in self._full_until.items()
                                if not set(k) & set(keys)}  # room again, maybe
            if self.link.up:
                await self.link.call(lambda: self._release(
                    keys=[self._key("leases", k) for k in keys], args=[member] * len(keys)))

    def shed(self, dest: Destination) -> bool:
        """True: this worker holds more connections to `dest` than its share, close this
        one (it is counted as closing from now on, call `release` once closed). Its
        share: while others wait for room, its fair share (as of the last renewal);
        while Redis is down, its local share."""
        budgets = self.throttle.budgets(dest)
        if not any(self._over(b) for b in budgets):
            return False
        for b in budgets:
            self._closing[b.key] = self._closing.get(b.key, 0) + 1
        return True

    def _over(self, budget: Budget) -> bool:
        closing = self._closing.get(budget.key, 0)
        if self.link.up:
            return self._excess.get(budget.key, 0) - closing > 0
        return self._open(budget.key) - closing > self._local_max(budget)

    def open_connections(self) -> int:
        return sum(len(members) for members in self._held.values())

    def _granted(self, budgets: list[Budget], member: str, result: Any) -> float:
        text = result.decode() if isinstance(result, bytes) else str(result)
        if text == "ok":
            self._hold(budgets, member)
            return 0.0
        if text == "full":
            self._full_until[tuple(b.key for b in budgets)] = time.monotonic() + FULL_MEMORY
            return WAIT_FOR_CLOSE
        return max(float(text), 0.001)

    def _connect_locally(self, budgets: list[Budget]) -> float:
        holdoff = self._holdoff()
        if holdoff > 0:
            return holdoff
        if any(self._open(b.key) >= self._local_max(b) for b in budgets):
            return WAIT_FOR_CLOSE
        wait = take_all([self._local_gcra("conn", b.key, b.connection_rate, 1)
                         for b in budgets if b.connection_rate])
        if not wait:
            self._hold(budgets, self._member())
        return wait

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
        self._limits.update((b.key, b.max_connections) for b in budgets)

    def _member(self) -> str:
        return f"{self.link.member}#{next(self._serial)}"

    def _key(self, kind: str, scope: str) -> str:
        return self.link.key("throttle", kind, scope)

    def _lease_keys(self, budgets: list[Budget]) -> list[str]:
        return [self._key(kind, b.key) for b in budgets for kind in ("leases", "waiters", "conn")]

    def _lease_args(self, member: str, budgets: list[Budget]) -> list[Any]:
        args: list[Any] = [member, self.ttl, self.wait_ttl]
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

    async def pace(self, scope: str, rate: float, burst: int) -> float | None:
        """A turn at a pace shared by every node (an account's rate), reserved up to
        PACE_RESERVE_MAX ahead; None while Redis cannot answer (pace locally)."""
        if not self.link.up:
            return None
        result = await self.link.call(lambda: self._pace(
            keys=[self._key("pace", scope)], args=[1, PACE_RESERVE_MAX, 1.0 / rate, burst]))
        if result is DOWN:
            return None
        taken, delay = int(result[0]), float(result[1])
        return max(delay, 0.0) if taken else max(delay - PACE_RESERVE_MAX, 0.001)

    def _token_in_hand(self, keys: tuple[str, ...]) -> float | None:
        """0.0: a token was taken; > 0: tokens are reserved, usable after that wait;
        None: no tokens (ask Redis)."""
        now = time.monotonic()
        batches = [t for t in self._tokens.get(keys, ()) if t.count and now <= t.usable + TOKEN_LIFE]
        if not batches:
            self._tokens.pop(keys, None)
            return None
        self._tokens[keys] = batches
        first = min(batches, key=lambda t: t.usable)
        if now < first.usable:
            return first.usable - now
        first.count -= 1
        return 0.0

    def _reserved(self, keys: tuple[str, ...], quantity: int, result: Any) -> float:
        taken, delay = int(result[0]), float(result[1])
        if not taken:
            return max(delay, 0.001)
        if delay <= 0:
            quantity -= 1  # one is used now
        if quantity:  # several connections may have asked at once: keep every batch
            self._tokens.setdefault(keys, []).append(Tokens(quantity, time.monotonic() + delay))
        return delay

    @staticmethod
    def _pace_args(quantity: int, budgets: list[Budget]) -> list[Any]:
        args: list[Any] = [quantity, RESERVE_MAX]
        for b in budgets:
            args += [1.0 / (b.message_rate or 1.0), b.message_burst]
        return args

    def _send_locally(self, budgets: list[Budget]) -> float:
        return take_all([self._local_gcra("msg", b.key, b.message_rate, b.message_burst)
                         for b in budgets if b.message_rate])

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
            await asyncio.sleep(min(self.ttl / 3, RENEW_INTERVAL))
            if self.link.up:
                await self._write_leases()

    async def _write_leases(self) -> None:
        """Every lease held, written again; and the excess over the fair shares learnt."""
        async with self._lock:
            pairs = [(self._key("leases", k), m)
                     for keys, members in self._held.items() for m in members for k in keys]
            scopes = sorted({k for keys in self._held for k in keys})
            if not scopes:
                self._excess.clear()
                return
            keys = [k for k, _ in pairs] + [self._key(kind, scope) for scope in scopes
                                            for kind in ("leases", "waiters")]
            args = [self.ttl, self.link.member, len(pairs), *(m for _, m in pairs),
                    *(self._limits.get(scope, 1) for scope in scopes)]
            excess = await self.link.call(lambda: self._renew(keys=keys, args=args))
            if excess is not DOWN:
                self._excess = {scope: int(n) for scope, n in zip(scopes, excess, strict=True)}
                if any(self._excess.values()):
                    for on_excess in self._on_excess:
                        on_excess()

