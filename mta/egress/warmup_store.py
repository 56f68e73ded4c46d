"""Where warm-up state lives: the ramps, the day's counts and the day's health signals.

One node: the spool's LMDB (named database ``warmup``), shared by all the workers of the
node; every write is an operation of the group commit, so "count if under the cap" is one
LMDB write transaction and two workers can never both take the last message of a cap.
Several nodes ([cluster] redis): the same in Redis (mta.cluster.warmup), the
check-and-count a Lua script.

Keys (one pair: a source and a provider, `day` an ISO date in the warm-up time zone):
the ramp (`mta.egress.warmup.Ramp`), the messages taken on a day, the signals of a day.
A ramp is replaced only if it is still the one the caller judged (compare and set), so
one worker rolls a day over and only it tells of the transition.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import msgpack

from mta.egress.warmup import Ramp, Signals
from mta.queue.spool import Spool

DAY_TTL = 3 * 86400  # a day's count is kept this long in Redis (seconds)
SIGNALS_TTL = 14 * 86400  # a day's signals likewise


class Take(enum.Enum):
    OK = "ok"  # counted: the message may go
    FULL = "full"  # the cap of the day is reached
    STALE = "stale"  # the ramp changed meanwhile: look again
    UNAVAILABLE = "unavailable"  # Redis is down: nothing can be counted now


Pair = tuple[str, str]  # (source, provider)


class RampStore(Protocol):
    async def ramp(self, pair: Pair) -> Ramp | None: ...

    async def replace(self, pair: Pair, old: Ramp | None, new: Ramp) -> bool:
        """Write `new` if the stored ramp is still `old` (same day and step)."""

    async def take(self, pair: Pair, ramp: Ramp, cap: int | None) -> Take:
        """Count one message on `ramp.day` if `ramp` is still current and under `cap`."""

    async def signals(self, pair: Pair, day: str) -> Signals: ...

    async def add_signals(self, counts: dict[tuple[str, str, str], dict[str, int]]) -> None:
        """Add (source, provider, day) -> {signal name: count}."""

    async def overview(self, day: str) -> list[tuple[Pair, Ramp, int, Signals]]:
        """Every known pair: its ramp, the messages taken on `day` and its signals."""


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False)


def _key(kind: str, *parts: str) -> bytes:
    return "\0".join((kind, *parts)).encode()


def _same(a: Ramp | None, b: Ramp | None) -> bool:
    if a is None or b is None:
        return a is b
    return (a.day, a.step) == (b.day, b.step)


class LmdbRampStore:
    """The node's warm-up state in the spool (all workers of the node share it)."""

    def __init__(self, spool: Spool, submit: Callable[[Callable[[Any], Any]], Awaitable[Any]]
                 ) -> None:
        self.spool = spool
        self.db = spool.open_db("warmup")
        self.submit = submit  # the group commit's submit

    def _get_ramp(self, txn: Any, pair: Pair) -> Ramp | None:
        raw = txn.get(_key("r", *pair), db=self.db)
        return None if raw is None else Ramp.from_dict(_unpack(raw))

    async def ramp(self, pair: Pair) -> Ramp | None:
        with self.spool.env.begin(db=self.db) as txn:
            return self._get_ramp(txn, pair)

    async def replace(self, pair: Pair, old: Ramp | None, new: Ramp) -> bool:
        def op(txn: Any) -> bool:
            if not _same(self._get_ramp(txn, pair), old):
                return False
            txn.put(_key("r", *pair), _pack(new.as_dict()), db=self.db)
            if old is not None:  # the judged day's records are no longer needed
                txn.delete(_key("t", *pair, old.day), db=self.db)
                txn.delete(_key("s", *pair, old.day), db=self.db)
            return True

        return bool(await self.submit(op))

    async def take(self, pair: Pair, ramp: Ramp, cap: int | None) -> Take:
        def op(txn: Any) -> Take:
            if not _same(self._get_ramp(txn, pair), ramp):
                return Take.STALE
            key = _key("t", *pair, ramp.day)
            raw = txn.get(key, db=self.db)
            taken = 0 if raw is None else _unpack(raw)
            if cap is not None and taken >= cap:
                return Take.FULL
            txn.put(key, _pack(taken + 1), db=self.db)
            return Take.OK

        return await self.submit(op)

    async def signals(self, pair: Pair, day: str) -> Signals:
        with self.spool.env.begin(db=self.db) as txn:
            raw = txn.get(_key("s", *pair, day), db=self.db)
        return Signals() if raw is None else Signals.from_dict(_unpack(raw))

    async def add_signals(self, counts: dict[tuple[str, str, str], dict[str, int]]) -> None:
        if not counts:
            return

        def op(txn: Any) -> None:
            for (source, provider, day), deltas in counts.items():
                key = _key("s", source, provider, day)
                raw = txn.get(key, db=self.db)
                current = {} if raw is None else _unpack(raw)
                for name, n in deltas.items():
                    current[name] = current.get(name, 0) + n
                txn.put(key, _pack(current), db=self.db)

        await self.submit(op)

    async def overview(self, day: str) -> list[tuple[Pair, Ramp, int, Signals]]:
        rows = []
        with self.spool.env.begin(db=self.db) as txn:
            for raw_key, raw in txn.cursor():
                kind, *parts = bytes(raw_key).decode().split("\0")
                if kind != "r":
                    continue
                pair = (parts[0], parts[1])
                taken_raw = txn.get(_key("t", *pair, day), db=self.db)
                signals_raw = txn.get(_key("s", *pair, day), db=self.db)
                rows.append((pair, Ramp.from_dict(_unpack(raw)),
                             0 if taken_raw is None else _unpack(taken_raw),
                             Signals() if signals_raw is None
                             else Signals.from_dict(_unpack(signals_raw))))
        return rows
