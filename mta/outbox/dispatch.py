"""The dispatcher: worker 0 hands the outbox's events to every sink, in order, at least once.

One task per sink. Each reads the outbox after the sink's cursor (read transactions of
a bounded number of entries, on the event loop: cheap, and never in the writer's way),
keeps the events the sink `wants`, and once `batch_size` of them are there, or
`batch_wait` seconds after the first one was seen, hands them over. A batch is retried
(the same events, the same ids) with exponential backoff and jitter until the sink takes
it; once its oldest event is older than the sink's `max_age`, the batch goes to the sink's
dead letters instead (kept until `mta webhook replay`), so nothing is dropped silently.
Then the cursor moves past the batch (and past the events it did not want) and what
every sink has passed leaves the outbox, in one small group-committed write. Delivery
and intake never wait for any of this: their only cost is the outbox append.

A monitor task checks the outbox's depth and the age of its oldest event; past
`[outbox] alert_depth` / `alert_age` it logs a warning (again every ALERT_REPEAT seconds
while it lasts); the same figures are metrics and on the dashboard (mta.outbox.status).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from mta.outbox import store
from mta.outbox.sink import EventSink
from mta.text import shown

log = logging.getLogger("mta.outbox")

POLL_INTERVAL = 0.2  # seconds between looks at the outbox when idle (other workers append)
MIN_READ_INTERVAL = 0.05  # a sink's reads at most this often, however busy the workers are
PAGE = 500  # entries per read at most
MIN_PAGE = 50
MAX_PAGES = 20  # pages scanned per round before yielding (a sink that wants few events)
MONITOR_INTERVAL = 5.0
ALERT_REPEAT = 300.0
DEFAULT_BATCH_WAIT = 1.0
DEFAULT_MAX_AGE = 86400.0
DEFAULT_TIMEOUT = 30.0

Submit = Callable[[Callable[[Any], Any]], Awaitable[Any]]


def backoff(attempt: int, initial: float, maximum: float, jitter: float = 0.25,
            rng: random.Random | Any = random) -> float:
    """Seconds before retry number `attempt` (1, 2, ...): doubling from `initial`, capped
    at `maximum`, spread by +-`jitter` of itself so that retries of many batches do not
    arrive together."""
    base = min(maximum, initial * 2 ** max(0, attempt - 1))
    return max(0.0, base * (1 + rng.uniform(-jitter, jitter)))


@dataclass
class Batch:
    entries: list[store.Entry]  # the events the sink wants, in order
    upto: int  # the cursor once it is passed: its last entry, or further (unwanted ones)

    @property
    def events(self) -> list[dict[str, Any]]:
        return [e.event for e in self.entries]


def collect(entries: list[store.Entry], sink: EventSink, limit: int, after: int
            ) -> Batch:
    """The first `limit` entries `sink` wants among `entries` (in order, after `after`),
    and how far the cursor may move once they are passed. Pure."""
    chosen: list[store.Entry] = []
    upto = after
    for entry in entries:
        if entry.seq <= after:
            continue
        if entry.for_sink(sink.name) and sink.wants(entry.event):
            if len(chosen) >= limit:
                break
            chosen.append(entry)
        upto = entry.seq
    return Batch(chosen, upto)


@dataclass
class SinkStatus:
    """What the dispatcher knows about one sink (shown by `mta webhook status`)."""

    name: str
    delivered: int = 0  # events taken since this worker started
    batches: int = 0
    failures: int = 0  # failed attempts since the last success
    last_error: str = ""
    last_success: float = 0.0
    next_attempt: float = 0.0  # when a failed batch is tried again (0: not waiting)
    dead_lettered: int = 0


@dataclass
class Settings:
    retry_initial: float = 1.0
    retry_max: float = 300.0
    alert_depth: int = 100_000
    alert_age: float = 3600.0
    poll_interval: float = POLL_INTERVAL


@dataclass
class Dispatcher:
    spool: Any
    submit: Submit  # worker 0's group committer
    sinks: list[EventSink]
    settings: Settings = field(default_factory=Settings)
    clock: Callable[[], float] = time.time
    rng: Any = random
    status: dict[str, SinkStatus] = field(default_factory=dict)
    over_limit: bool = False

    def __post_init__(self) -> None:
        self._tasks: list[asyncio.Task[None]] = []
        self._wakeup: dict[str, asyncio.Event] = {}
        self._last_alert = -float("inf")
        for sink in self.sinks:
            self.status[sink.name] = SinkStatus(sink.name)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for sink in self.sinks:
            self._wakeup[sink.name] = asyncio.Event()
            self._tasks.append(loop.create_task(self._run_sink(sink)))
        self._tasks.append(loop.create_task(self._monitor()))

    def wake(self) -> None:
        """New events were committed (by this worker): look now rather than at the poll."""
        for event in self._wakeup.values():
            event.set()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for sink in self.sinks:
            with contextlib.suppress(Exception):
                await sink.close()

    # --- one sink ------------------------------------------------------------------------

    async def _run_sink(self, sink: EventSink) -> None:
        """Read ahead what the sink wants (each entry read once), hand it over in batches."""
        with self.spool.read() as txn:
            position = store.cursor(self.spool, txn, sink.name)
        pending = Batch([], position)  # read, wanted, not handed over yet; scanned to upto
        first_seen: float | None = None
        batch_wait = float(getattr(sink, "batch_wait", DEFAULT_BATCH_WAIT))
        last_read = -float("inf")
        while True:
            try:
                if len(pending.entries) < sink.batch_size:
                    wait = last_read + MIN_READ_INTERVAL - time.monotonic()
                    if wait > 0:  # woken by every commit of a busy engine: not every time
                        await asyncio.sleep(wait)
                    last_read = time.monotonic()
                    more = self.read_batch(sink, pending.upto,
                                           sink.batch_size - len(pending.entries))
                    pending = Batch(pending.entries + more.entries, more.upto)
            except Exception:
                log.exception("outbox: could not read the outbox for %s", sink.name)
                await asyncio.sleep(self.settings.poll_interval * 10)
                continue
            if not pending.entries:
                first_seen = None
                if pending.upto > position:  # only events it does not want: move on
                    position = await self._advance(sink, pending.upto, position)
                    continue
                await self._idle(sink, self.settings.poll_interval)
                continue
            if len(pending.entries) < sink.batch_size:
                now = time.monotonic()
                first_seen = now if first_seen is None else first_seen
                left = batch_wait - (now - first_seen)
                if left > 0:
                    await self._idle(sink, min(left, self.settings.poll_interval))
                    continue
            first_seen = None
            taken, rest = pending.entries[:sink.batch_size], pending.entries[sink.batch_size:]
            batch = Batch(taken, taken[-1].seq if rest else pending.upto)
            await self._hand_over(sink, batch)
            position = await self._advance(sink, batch.upto, position)
            pending = Batch(rest, pending.upto)

    def read_batch(self, sink: EventSink, after: int, room: int) -> Batch:
        """Up to `room` entries `sink` wants after `after` (reading at most MAX_PAGES pages),
        and how far that scan went."""
        chosen: list[store.Entry] = []
        upto = after
        with self.spool.read() as txn:
            for _ in range(MAX_PAGES):
                page = min(PAGE, max(MIN_PAGE, 2 * (room - len(chosen))))
                entries = store.read_after(self.spool, txn, upto, page)
                part = collect(entries, sink, room - len(chosen), upto)
                chosen += part.entries
                upto = part.upto
                if len(chosen) >= room or len(entries) < page:
                    break
        return Batch(chosen, upto)

    async def _idle(self, sink: EventSink, seconds: float) -> None:
        wakeup = self._wakeup.get(sink.name)
        if wakeup is None:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await wakeup.wait()
        wakeup.clear()

    async def _hand_over(self, sink: EventSink, batch: Batch) -> None:
        """Deliver `batch` until the sink takes it, or dead-letter it past max_age."""
        status = self.status[sink.name]
        timeout = float(getattr(sink, "timeout", DEFAULT_TIMEOUT)) + 5.0
        max_age = float(getattr(sink, "max_age", DEFAULT_MAX_AGE))
        attempt = 0
        while True:
            try:
                async with asyncio.timeout(timeout):
                    await sink.deliver(batch.events)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # SinkFailed, a timeout, or a sink's own bug
                attempt += 1
                status.failures += 1
                status.last_error = shown(str(exc) or type(exc).__name__, 300)
                if self._too_old(batch, max_age):
                    await self._dead_letter(sink, batch, status.last_error)
                    return
                delay = backoff(attempt, self.settings.retry_initial, self.settings.retry_max,
                                rng=self.rng)
                status.next_attempt = self.clock() + delay
                if attempt == 1 or attempt % 10 == 0:
                    log.warning("outbox: %s did not take %d events (%s); attempt %d, next in "
                                "%.1fs", sink.name, len(batch.entries), status.last_error,
                                attempt, delay)
                await asyncio.sleep(delay)
                continue
            status.delivered += len(batch.entries)
            status.batches += 1
            status.failures = 0
            status.next_attempt = 0.0
            status.last_success = self.clock()
            if attempt:
                log.info("outbox: %s took the batch after %d failed attempts", sink.name,
                         attempt)
            return

    def _too_old(self, batch: Batch, max_age: float) -> bool:
        times = [e.event.get("time") for e in batch.entries]
        oldest = min((t for t in times if isinstance(t, int | float)), default=self.clock())
        return self.clock() - oldest >= max_age

    async def _dead_letter(self, sink: EventSink, batch: Batch, reason: str) -> None:
        now = self.clock()
        await self._write(lambda txn: store.add_dead(self.spool, txn, sink.name, batch.entries,
                                                     reason, now))
        self.status[sink.name].dead_lettered += len(batch.entries)
        log.error("outbox: %d events for %s are dead letters after max_age (%s); see "
                  "`mta webhook dead %s`, replay with `mta webhook replay %s`",
                  len(batch.entries), sink.name, reason, sink.name, sink.name)

    async def _advance(self, sink: EventSink, upto: int, position: int) -> int:
        """Move the sink's cursor to `upto` and prune what every sink has passed. On a
        write failure the position still moves here (the events go again after a restart:
        at least once)."""
        names = [s.name for s in self.sinks]

        def op(txn: Any) -> None:
            store.set_cursor(self.spool, txn, sink.name, upto)
            store.prune(self.spool, txn, names)

        await self._write(op)
        return max(position, upto)

    async def _write(self, op: Callable[[Any], Any]) -> None:
        try:
            await self.submit(op)
        except Exception as exc:
            log.error("outbox: could not write its state: %s", shown(str(exc), 200))

    # --- the operator's alert --------------------------------------------------------------

    async def _monitor(self) -> None:
        while True:
            try:
                self.check_limits()
            except Exception:
                log.exception("outbox: monitor failed")
            await asyncio.sleep(MONITOR_INTERVAL)

    def check_limits(self) -> store.OutboxFigures:
        now = self.clock()
        with self.spool.read() as txn:
            figures = store.figures(self.spool, txn, now)
        over = over_limits(figures, self.settings.alert_depth, self.settings.alert_age)
        if over and (not self.over_limit or now - self._last_alert >= ALERT_REPEAT):
            self._last_alert = now
            log.warning("outbox over its limit: %d events waiting, the oldest for %.0fs "
                        "([outbox] alert_depth %d, alert_age %.0fs); see `mta webhook status`",
                        figures.depth, figures.oldest_age, self.settings.alert_depth,
                        self.settings.alert_age)
        elif self.over_limit and not over:
            log.info("outbox back under its limits: %d events waiting", figures.depth)
        self.over_limit = over
        return figures


def over_limits(figures: store.OutboxFigures, alert_depth: int, alert_age: float) -> bool:
    return figures.depth > alert_depth or figures.oldest_age > alert_age
