"""The warm-up state of several nodes in Redis (the `RampStore` of mta.egress.warmup_store
for [cluster] redis): ramps and the day's counts and signals, the check-and-count a Lua
script, a ramp replaced only if it is still the one the caller judged."""

from __future__ import annotations

from typing import Any

from mta.cluster.link import DOWN, RedisLink
from mta.egress.warmup import Ramp, Signals
from mta.egress.warmup_store import DAY_TTL, SIGNALS_TTL, Pair, Take

# KEYS: the ramp hash, the day's count. ARGV: day, step, cap (0: unlimited), ttl (s).
TAKE_LUA = """
local day = redis.call('HGET', KEYS[1], 'day')
local step = redis.call('HGET', KEYS[1], 'step')
if day ~= ARGV[1] or step ~= ARGV[2] then return 'stale' end
local cap = tonumber(ARGV[3])
local taken = tonumber(redis.call('GET', KEYS[2]) or '0')
if cap > 0 and taken >= cap then return 'full' end
redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[4]))
return 'ok'
"""

# KEYS: the ramp hash, the set of pairs. ARGV: old day ('' : none), old step, pair member,
# then the new ramp's fields and values.
REPLACE_LUA = """
local day = redis.call('HGET', KEYS[1], 'day') or ''
local step = redis.call('HGET', KEYS[1], 'step') or ''
if day ~= ARGV[1] or (day ~= '' and step ~= ARGV[2]) then return 0 end
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('SADD', KEYS[2], ARGV[3])
return 1
"""


class RedisRampStore:
    """The cluster's warm-up state in Redis. While Redis is down nothing is taken (a
    warming source carries nothing: its caps cannot be checked) and signals are kept
    to be added when it is back."""

    def __init__(self, link: RedisLink) -> None:
        self.link = link
        redis = link.redis
        self._take = redis.register_script(TAKE_LUA)
        self._replace = redis.register_script(REPLACE_LUA)
        self.pending: dict[tuple[str, str, str], dict[str, int]] = {}

    def _ramp_key(self, pair: Pair) -> str:
        return self.link.key("warmup", "ramp", *pair)

    def _day_key(self, kind: str, pair: Pair, day: str) -> str:
        return self.link.key("warmup", kind, *pair, day)

    async def ramp(self, pair: Pair) -> Ramp | None:
        raw = await self.link.call(lambda: self.link.redis.hgetall(self._ramp_key(pair)))
        if raw is DOWN or not raw:
            return None
        return Ramp.from_dict({k.decode(): v.decode() for k, v in raw.items()})

    async def replace(self, pair: Pair, old: Ramp | None, new: Ramp) -> bool:
        fields: list[str] = []
        for name, value in new.as_dict().items():
            fields += [name, str(value)]
        args = ["" if old is None else old.day, "" if old is None else str(old.step),
                "\t".join(pair), *fields]
        keys = [self._ramp_key(pair), self.link.key("warmup", "pairs")]
        done = await self.link.call(lambda: self._replace(keys=keys, args=args))
        return done is not DOWN and int(done) == 1

    async def take(self, pair: Pair, ramp: Ramp, cap: int | None) -> Take:
        keys = [self._ramp_key(pair), self._day_key("taken", pair, ramp.day)]
        args = [ramp.day, str(ramp.step), str(cap or 0), str(DAY_TTL)]
        answer = await self.link.call(lambda: self._take(keys=keys, args=args))
        if answer is DOWN:
            return Take.UNAVAILABLE
        return Take(answer.decode() if isinstance(answer, bytes) else answer)

    async def signals(self, pair: Pair, day: str) -> Signals:
        raw = await self.link.call(
            lambda: self.link.redis.hgetall(self._day_key("signals", pair, day)))
        if raw is DOWN or not raw:
            return Signals()
        return Signals.from_dict({k.decode(): int(v) for k, v in raw.items()})

    async def add_signals(self, counts: dict[tuple[str, str, str], dict[str, int]]) -> None:
        for key, deltas in counts.items():
            into = self.pending.setdefault(key, {})
            for name, n in deltas.items():
                into[name] = into.get(name, 0) + n
        if not self.pending:
            return
        batch, self.pending = self.pending, {}

        async def write() -> None:
            pipe = self.link.redis.pipeline(transaction=False)
            for (source, provider, day), deltas in batch.items():
                key = self._day_key("signals", (source, provider), day)
                for name, n in deltas.items():
                    pipe.hincrby(key, name, n)
                pipe.expire(key, SIGNALS_TTL)
            await pipe.execute()

        if await self.link.call(write) is DOWN:  # kept for the next flush
            for key, deltas in batch.items():
                into = self.pending.setdefault(key, {})
                for name, n in deltas.items():
                    into[name] = into.get(name, 0) + n

    async def overview(self, day: str) -> list[tuple[Pair, Ramp, int, Signals]]:
        """Two round trips: the pairs, then one pipeline of their ramps and counts."""
        members = await self.link.call(
            lambda: self.link.redis.smembers(self.link.key("warmup", "pairs")))
        if members is DOWN or not members:
            return []
        pairs: list[Pair] = []
        for member in sorted(m.decode() for m in members):
            source, _, provider = member.partition("\t")
            pairs.append((source, provider))

        async def read() -> list[Any]:
            pipe = self.link.redis.pipeline(transaction=False)
            for pair in pairs:
                pipe.hgetall(self._ramp_key(pair))
                pipe.get(self._day_key("taken", pair, day))
                pipe.hgetall(self._day_key("signals", pair, day))
            return await pipe.execute()

        answers = await self.link.call(read)
        if answers is DOWN:
            return []
        rows = []
        for i, pair in enumerate(pairs):
            ramp_raw, taken, signals_raw = answers[3 * i: 3 * i + 3]
            if not ramp_raw:
                continue
            ramp = Ramp.from_dict({k.decode(): v.decode() for k, v in ramp_raw.items()})
            signals = Signals.from_dict({k.decode(): int(v) for k, v in signals_raw.items()})
            rows.append((pair, ramp, int(taken or 0), signals))
        return rows

