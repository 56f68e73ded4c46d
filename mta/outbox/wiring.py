"""How events enter the outbox, and the outbox's part of a worker (`start_outbox`).

Every event that at least one configured sink `wants` is appended to the outbox
(mta.outbox.store) in a write transaction of the worker's group committer, by one of
two paths, chosen so that a kill -9 at any moment loses no event:

1. In the transaction of the change (`OutboxRecorder.record`), for the events that are
   emitted only after their change has committed: the change's own operation builds
   them and appends them, and the same dicts (now with their `event_id`) go to the
   event log after the commit. These are
   - the delivery outcomes (Delivery, Bounce, TransientFailure (a deferral),
     Expiration, InboundProcessed): the scheduler's outcome operation calls its
     `record_events` hook (mta.delivery.service.record_outcome_events);
   - Reception: intake's store operation (mta.smtp.intake.with_events);
   - the policy guard's CampaignPaused and the Unsubscribe of a one-click link or an
     unsubscribe mail: the counting batch that decides them (mta.policy.counting), or
     the pause decided on the cluster's totals (mta.cluster.policy);
   - Open and Click: the transaction that counts them (mta.tracking.hits);
   - the operators' actions through the admin API on the guard (CampaignPaused,
     CampaignResumed, CampaignDropped, AccountSuspended, HeldReleased, ...:
     mta.http.guard_operations.GuardOperations._write_emitting).
2. Queued with the committer at the moment of `emit` (`OutboxRecorder.on_event`, an
   event log listener), for every other event. The committer runs operations in the
   order they were queued (mta.queue.commit.GroupCommitter.enqueue), so an event
   emitted *before* its change is submitted commits in the same transaction as the
   change or an earlier one: if the change is on disk, so is the event; if not, the
   change (and its event) happen again after a restart. The inbound path works this
   way (a bounce report's, complaint's or ARF opt-out's events are emitted, then the
   report's job completes), as do events with no change behind them (Auth,
   ThrottleChange, ...).

What path 2 leaves open is an event emitted after a change that committed before it,
durable from the next commit a few milliseconds later: the queue rules' events
(QueueRuleAdded, QueueRuleLifted) when an engine worker adds or lifts a rule itself
(a rule carried over by a drained message, a rule that expires). The operators' actions
through the admin API use path 1 (`write_emitting`).
Moving one to path 1 is a small change at its producer (build the event inside the
operation and call `ctx.outbox.record(txn, events)`). The CLI acting on the spool
directly appends its events itself right after its change (`append_now`).

Without a configured sink nothing here runs: no listener, no hook, no outbox writes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from mta.outbox import store
from mta.outbox.dispatch import Dispatcher, Settings
from mta.outbox.sink import EventSink
from mta.outbox.sinks import build_sinks

log = logging.getLogger("mta.outbox")


T = TypeVar("T")
Record = Callable[[Any, list[dict[str, Any]]], None]


async def write_emitting(write: Callable[[Callable[[Any], T]], Awaitable[T]],
                         record: Record | None, emit: Callable[[dict[str, Any]], None],
                         fn: Callable[[Any], T],
                         events_of: Callable[[T], list[dict[str, Any]]]) -> T:
    """Path 1 for an operator's action: `fn` in a write transaction (`write`), the events
    of its result built and `record`ed in that same transaction (when an outbox is kept),
    then emitted once committed."""
    built: list[dict[str, Any]] = []

    def run(txn: Any) -> T:
        result = fn(txn)
        built[:] = events_of(result)
        if record is not None and built:
            record(txn, built)
        return result

    result = await write(run)
    for event in built:
        emit(event)
    return result


class OutboxRecorder:
    """Appends the events the sinks want to the outbox (see the module's docstring)."""

    def __init__(self, spool: Any, enqueue: Callable[[Callable[[Any], Any]], Any],
                 sinks: list[EventSink], worker: int,
                 wake: Callable[[], None] | None = None) -> None:
        self.spool = spool
        self.enqueue = enqueue  # the group committer's enqueue (queues at once, in order)
        self.sinks = sinks
        self.worker = worker
        self.wake = wake or (lambda: None)
        self._lock = threading.Lock()  # the bucket is swapped in the writer thread
        self._bucket: list[dict[str, Any]] = []
        self._queued = False
        self.lost = 0  # events whose append failed (the spool full): logged, counted
        self.dispatcher: Dispatcher | None = None  # worker 0's

    def wanted(self, event: dict[str, Any]) -> bool:
        return any(sink.wants(event) for sink in self.sinks)

    def record(self, txn: Any, events: list[dict[str, Any]]) -> None:
        """Path 1, inside the caller's write transaction: the wanted events get their
        `event_id` (the log shows it too) and are appended."""
        chosen = [store.outbox_event(store.stamp(e, self.worker))
                  for e in events if self.wanted(e)]
        if chosen:
            store.append(self.spool, txn, chosen)

    def on_event(self, event: dict[str, Any]) -> None:
        """Path 2, an event log listener: queue the event's append now."""
        if "event_id" in event:  # appended by path 1 with its change, now committed
            self.wake()
            return
        if not self.wanted(event):
            return
        entry = store.outbox_event(store.stamp(event, self.worker))
        with self._lock:
            self._bucket.append(entry)
            if self._queued:
                return  # the queued operation has not run yet: it takes this one too
            self._queued = True
        future = self.enqueue(self._append_op())
        future.add_done_callback(self._appended)

    def _append_op(self) -> Callable[[Any], int]:
        taken: list[dict[str, Any]] = []  # kept if the spool retries the op alone

        def append(txn: Any) -> int:
            if not taken:
                with self._lock:
                    taken.extend(self._bucket)
                    self._bucket = []
                    self._queued = False
            store.append(self.spool, txn, taken)
            return len(taken)

        return append

    def _appended(self, future: Any) -> None:
        result = future.result() if not future.cancelled() else None
        if isinstance(result, BaseException):
            self.lost += 1
            log.error("outbox: events could not be appended (%s); they are in the event "
                      "log only", result)
        else:
            self.wake()


def append_now(cfg: Any, spool: Any, event: dict[str, Any]) -> None:
    """An event of a process that is no worker (the CLI acting on the spool, after its
    change committed): into the outbox in a transaction of its own, if a sink wants it."""
    sinks = build_sinks(cfg)
    if not any(sink.wants(event) for sink in sinks):
        return
    entry = store.outbox_event(store.stamp(event, None))
    with spool.env.begin(write=True) as txn:
        store.append(spool, txn, [entry])


def warn_of_leftovers(spool: Any) -> None:
    """Events kept from a time when sinks were configured are never dropped silently."""
    with spool.read() as txn:
        figures = store.figures(spool, txn, time.time())
    if figures.depth:
        log.warning("outbox: %d events wait for sinks no longer configured (the oldest for "
                    "%.0fs); configure the sink again to deliver them", figures.depth,
                    figures.oldest_age)


def dispatch_settings(cfg: Any) -> Settings:
    return Settings(retry_initial=cfg.outbox.retry_initial, retry_max=cfg.outbox.retry_max,
                    alert_depth=cfg.outbox.alert_depth, alert_age=cfg.outbox.alert_age)


def start_outbox(ctx: Any) -> OutboxRecorder | None:
    """The outbox's part of a worker: the recorder in every worker, the dispatcher in
    worker 0 (it reads the outbox for all). None when no sink is configured."""
    sinks = build_sinks(ctx.cfg)
    if not sinks:
        if ctx.seat.leader:
            warn_of_leftovers(ctx.spool)
        return None
    dispatcher: Dispatcher | None = None
    if ctx.seat.leader:
        dispatcher = Dispatcher(ctx.spool, ctx.committer.submit, sinks,
                                dispatch_settings(ctx.cfg))
        dispatcher.start()
        ctx.on_close(dispatcher.close)
    else:
        async def close_sinks() -> None:
            for sink in sinks:
                await sink.close()

        ctx.on_close(close_sinks)
    recorder = OutboxRecorder(ctx.spool, ctx.committer.enqueue, sinks, ctx.index,
                              dispatcher.wake if dispatcher else None)
    recorder.dispatcher = dispatcher
    ctx.listen(recorder.on_event)
    return recorder
