"""AUTH failures per client address, counted for the whole engine, every worker alike.

Each worker process runs its own event loop, but an address must get `limit` guesses
from the engine, not `limit` from each worker. The counts live in a named database of
the spool (`auth`), which every worker has open: per address, the times of its recent
failures and the attempts being checked right now. A password is checked only under a
reservation, and one is made only while failures plus reservations stay under the
limit, so parallel connections, whichever worker they land on, get no more guesses in
than the limit. Reads are plain read transactions; the writes (a reservation, then its
outcome) go through the group committer and share its commits.

A reservation left behind by a worker that died expires after RESERVATION_TTL; the
records of addresses that stopped failing are swept out as failures come.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from mta.queue.spool import Spool, pack, unpack

RESERVATION_TTL = 60.0  # an attempt still unanswered after this is taken as abandoned
POLL_INTERVAL = 0.05  # while the address's guesses are all in progress elsewhere

Submit = Callable[[Callable[[Any], Any]], Awaitable[Any]]


@dataclass
class _Record:
    failures: list[float] = field(default_factory=list)  # wall-clock times
    pending: dict[str, float] = field(default_factory=dict)  # reservation -> when made

    @property
    def used(self) -> int:
        return len(self.failures) + len(self.pending)


class AuthLimit:
    def __init__(self, spool: Spool, submit: Submit, limit: int, window: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.spool = spool
        self.db = spool.open_db("auth")
        self.submit = submit  # GroupCommitter.submit
        self.limit = limit
        self.window = window
        self.clock = clock
        self._swept = 0.0

    def failures(self, ip: str) -> int:
        """Recent failures of `ip`, on any worker."""
        return len(self._read(ip).failures)

    async def reserve(self, ip: str) -> str | None:
        """Wait for room for one more attempt from `ip`: a reservation to `release`, or
        None when the address has used up its guesses."""
        give_up = time.monotonic() + RESERVATION_TTL
        while True:
            record = self._read(ip)
            if len(record.failures) >= self.limit:
                return None
            if record.used < self.limit:
                reservation = await self.submit(self._reserve_op(ip))
                if reservation is not None:
                    return reservation
            elif time.monotonic() > give_up:
                return None
            else:
                await asyncio.sleep(POLL_INTERVAL)

    async def release(self, ip: str, reservation: str, failed: bool) -> None:
        await self.submit(self._release_op(ip, reservation, failed))

    # --- records ---------------------------------------------------------------------------

    def _read(self, ip: str) -> _Record:
        with self.spool.read() as txn:
            return self._load(txn, ip, self.clock())

    def _load(self, txn: Any, ip: str, now: float) -> _Record:
        raw = txn.get(ip.encode(), db=self.db)
        return _Record() if raw is None else self._parse(raw, now)

    def _parse(self, raw: bytes, now: float) -> _Record:
        """A stored record without what has expired."""
        failures, pending = unpack(raw)
        return _Record([t for t in failures if abs(now - t) < self.window],
                       {r: t for r, t in pending.items() if abs(now - t) < RESERVATION_TTL})

    def _save(self, txn: Any, ip: str, record: _Record) -> None:
        if record.used:
            txn.put(ip.encode(), pack([record.failures, record.pending]), db=self.db)
        else:
            txn.delete(ip.encode(), db=self.db)

    def _reserve_op(self, ip: str) -> Callable[[Any], str | None]:
        def reserve(txn: Any) -> str | None:  # checked again: another worker may have won
            now = self.clock()
            record = self._load(txn, ip, now)
            if record.used >= self.limit:
                return None
            reservation = os.urandom(8).hex()
            record.pending[reservation] = now
            self._save(txn, ip, record)
            return reservation

        return reserve

    def _release_op(self, ip: str, reservation: str, failed: bool) -> Callable[[Any], None]:
        def release(txn: Any) -> None:
            now = self.clock()
            record = self._load(txn, ip, now)
            record.pending.pop(reservation, None)
            if failed:
                record.failures.append(now)
                self._sweep(txn, now)
            self._save(txn, ip, record)

        return release

    def _sweep(self, txn: Any, now: float) -> None:
        """Drop the records with nothing recent left, at most once a window."""
        if now - self._swept < self.window:
            return
        self._swept = now
        stale = [bytes(key) for key, raw in txn.cursor(db=self.db)
                 if not self._parse(bytes(raw), now).used]
        for key in stale:
            txn.delete(key, db=self.db)
