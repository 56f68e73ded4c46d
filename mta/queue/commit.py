"""Group commit: many spool writes from concurrent sessions share one transaction.

Callers await `submit(op)`; a single writer thread runs every operation queued
since the last commit in one LMDB write transaction (one fsync), then wakes
each caller with its own result. While one commit is on disk the next batch
gathers, so a burst of N messages costs a handful of fsyncs, not N.

The writer thread takes its next batch itself as soon as a commit is done, once it
holds the spool's write lock (which every worker's writer shares: what is queued while
it waits for the lock goes in this commit, not the next); it never waits for the event
loop between two commits (under load the loop may be busy for milliseconds before it
could hand over the next batch). An idle writer is woken at the end of the loop's turn,
so that what one turn queued goes in one transaction.

Operations queued as `lazy` (the outcomes of delivery attempts) do not call for a
commit of their own: they go with the next commit that intake or anything else asks
for, or at the latest `lazy_delay` seconds after they were queued. Delivery outcomes so
take far fewer fsyncs than messages when nothing else is written, and never delay an
intake commit. Their callers wait that much longer; a crash before the commit loses
only the outcome, so the message is delivered again (at least once, never lost).
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mta.queue.spool import Spool

log = logging.getLogger("mta.queue.commit")

LAZY_DELAY = 0.05  # seconds a lazy operation waits at most for a commit to join


@dataclass
class _Queued:
    op: Callable[[Any], Any]
    future: asyncio.Future[Any]
    lazy: bool
    at: float  # time.monotonic() when queued


class GroupCommitter:
    def __init__(self, spool: Spool, max_batch: int = 512,
                 lazy_delay: float = LAZY_DELAY) -> None:
        self.spool = spool
        self.max_batch = max_batch
        self.lazy_delay = lazy_delay
        self._queue: deque[_Queued] = deque()
        self._urgent = 0  # entries in the queue that are not lazy
        self._wanted = False  # the loop's turn that queued urgent ones has ended
        self._kick_pending = False
        self._stopping = False
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._deadlines = Deadlines()
        self.commits = 0
        self.operations = 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._write_forever, name="spool-writer",
                                        daemon=True)
        self._thread.start()

    async def submit(self, op: Callable[[Any], Any], lazy: bool = False,
                     timeout: float | None = None) -> Any:
        """Run op(txn) in the next group transaction; raise what it raised. With
        `timeout`, TimeoutError once that many seconds passed without the commit: only
        the wait ends, the queued operation still commits."""
        future = self.enqueue(op, lazy)
        if timeout is not None:
            self._deadlines.watch(future, timeout)
        result = await future
        if isinstance(result, BaseException):
            raise result
        return result

    def enqueue(self, op: Callable[[Any], Any], lazy: bool = False) -> asyncio.Future[Any]:
        """Queue op(txn) now, without waiting: operations run in the order they were
        queued, so whatever is queued later commits in the same transaction or a later
        one. The future's result is op's return value or the exception it raised.
        `lazy`: no commit is asked for; it joins the next one (within `lazy_delay`)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._cond:
            self._queue.append(_Queued(op, future, lazy, time.monotonic()))
            if lazy:
                if len(self._queue) == 1:
                    self._cond.notify()  # an idle writer starts the lazy wait now
                return future
            self._urgent += 1
            if not self._kick_pending:
                self._kick_pending = True
                loop.call_soon(self._kick)
        return future

    def _kick(self) -> None:
        """End of the loop's turn: what it queued is one batch; wake the writer."""
        with self._cond:
            self._kick_pending = False
            self._wanted = self._urgent > 0
            self._cond.notify()

    # --- the writer thread ---------------------------------------------------------

    def _due(self, eager: bool) -> bool:
        """Time for a commit (called with the lock held). `eager`: a commit just ended,
        so any urgent operation goes now, without waiting for the loop's turn to end."""
        if not self._queue:
            return False
        if self._stopping or self._wanted or (eager and self._urgent):
            return True
        return time.monotonic() - self._queue[0].at >= self.lazy_delay

    def _wait(self) -> float | None:
        """How long the writer may sleep (lock held): until the oldest lazy one is due."""
        if not self._queue:
            return None
        return max(0.001, self.lazy_delay - (time.monotonic() - self._queue[0].at))

    def _take(self) -> list[_Queued]:
        count = min(len(self._queue), self.max_batch)
        batch = [self._queue.popleft() for _ in range(count)]
        self._urgent -= sum(1 for entry in batch if not entry.lazy)
        self._wanted = self._wanted and self._urgent > 0
        return batch

    def _take_into(self, batch: list[_Queued]) -> list[Callable[[Any], Any]]:
        """Take the next batch (with the spool's write lock held: what was queued while
        the writer waited for it joins this commit)."""
        with self._cond:
            batch.extend(self._take())
        return [entry.op for entry in batch]

    def _write_forever(self) -> None:
        eager = False
        while True:
            with self._cond:
                while not self._due(eager):
                    if self._stopping and not self._queue:
                        return
                    self._cond.wait(self._wait())
                    eager = False
            batch: list[_Queued] = []
            try:
                results = self.spool.apply_taken(functools.partial(self._take_into, batch))
            except Exception as exc:  # the environment itself failed
                self._take_into(batch)
                results = [exc] * len(batch)
            self.commits += 1
            self.operations += len(batch)
            self._hand_back(batch, results)
            eager = True

    def _hand_back(self, batch: list[_Queued], results: list[Any]) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(_settle, batch, results)
        except RuntimeError:  # the loop is gone (shutting down): nobody waits any more
            log.debug("event loop closed; %d results dropped", len(batch))

    async def flush(self) -> None:
        """Commit everything queued so far, the lazy operations too; return once their
        callers have had their results (a stop must not leave outcomes unannounced)."""
        await self.submit(_nothing)

    async def close(self) -> None:
        """Finish what is queued, then stop."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        await asyncio.sleep(0)  # the last results are handed back


class Deadlines:
    """Ends the waits of futures not done in time, all on one timer. asyncio.timeout
    arms and cancels a timer of its own for every wait (some 7 us under uvloop, once a
    message at intake); here a wait costs a heap push, and done ones are dropped as
    they reach the front (commits end in about the order they were asked for)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, asyncio.Future[Any]]] = []
        self._count = itertools.count()
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, future: asyncio.Future[Any], timeout: float) -> None:
        loop = future.get_loop()
        deadline = loop.time() + timeout
        heap = self._heap
        while heap and heap[0][2].done():
            heapq.heappop(heap)
        heapq.heappush(heap, (deadline, next(self._count), future))
        if heap[0][2] is future:  # the first to end now: the timer is for it
            self._arm(loop)

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(self._heap[0][0], self._expire, loop) if self._heap else None

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        heap, now = self._heap, loop.time()
        while heap and (heap[0][0] <= now or heap[0][2].done()):
            future = heapq.heappop(heap)[2]
            if not future.done():
                future.set_exception(TimeoutError())
        self._timer = None
        self._arm(loop)


def _nothing(txn: Any) -> None:
    return None


def _settle(batch: list[_Queued], results: list[Any]) -> None:
    for entry, result in zip(batch, results, strict=True):
        if not entry.future.done():
            entry.future.set_result(result)
