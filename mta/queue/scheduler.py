"""The scheduler: finds due jobs of this worker's destinations and records their outcomes.

Each worker process owns the destinations whose domain hash falls in its share
(hash % workers == index), so no two processes ever deliver to one domain and
per-destination limits hold without shared counters. The scheduler reads the
`due` index; each due job is first offered to the hold check (a paused campaign's
or an operator's suspended scope's job is held, not sent), to the bounce check (an
operator's bounce rule: bounced with a DSN), to its campaign's delivery windows and
to its account's and campaign's pace (outside a window or before its turn, the job is
pushed to that time, no attempt counted); the others are marked `sending` and handed
to `dispatch` (delivery). The results of an attempt are applied in one group-committed
transaction: final recipients leave the job, deferred ones move to their next due
time, a DSN joins the spool in the same transaction as the bounce that caused it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from mta.config import DeliveryConfig
from mta.queue.commit import GroupCommitter
from mta.queue.intake_first import IntakeFirst
from mta.queue.jobs import HoldResult, Job
from mta.queue.outcome import AttemptOutcome, RcptResult, apply_attempt
from mta.queue.schedule import Windows
from mta.queue.spool import NewMessage, Spool, domain_hash

log = logging.getLogger("mta.scheduler")

POLL_INTERVAL = 0.05  # finds mail another worker accepted for this worker's domains
FULL_RESCAN_INTERVAL = 5.0
RESCAN_MARGIN_MS = 2000
PACE_SLACK = 0.02  # a paced message whose turn is this close goes now
MAX_TURNS = 100_000  # reserved turns remembered; past ones are forgotten beyond this


@dataclass
class Item:
    """A due job handed to delivery, with its message."""

    job: Job
    message: dict[str, Any]
    loaded: float
    maybe_sent: bool = False  # an earlier attempt was cut off (crash) mid-send
    provider: str = ""  # the throttle's provider of the route, once delivery knows it
    source: str = ""  # the egress source chosen for it, once chosen
    egress_provider: str = ""  # what the source's caps count it under (provider or site)

    @property
    def job_id(self) -> bytes:
        return self.job.id

    @property
    def domain(self) -> str:
        return self.job.domain


DsnBuilder = Callable[[dict[str, Any], list[RcptResult], bool], NewMessage | None]
# (write txn, item, outcome): records the outcome's events in the same transaction
# (the event outbox, mta.outbox.wiring), leaving them in outcome.events.
OutcomeRecorder = Callable[[Any, "Item", AttemptOutcome], None]


def chain_recorders(*recorders: OutcomeRecorder | None) -> OutcomeRecorder | None:
    """One outcome hook running each given one in turn (None: there is none)."""
    chosen = [r for r in recorders if r is not None]
    if len(chosen) <= 1:
        return chosen[0] if chosen else None

    def record(txn: Any, item: Item, outcome: AttemptOutcome) -> None:
        for recorder in chosen:
            recorder(txn, item, outcome)

    return record
Dispatch = Callable[[Item], None]


class HoldCheck(Protocol):
    """What decides that a due job is held instead of sent (the policy guard)."""

    def hold_reason(self, item: Item) -> str | None:
        """Why this item must not be sent now, or None (cheap: asked for every item)."""

    def still_holds(self, txn: Any, job: Job, reason: str) -> bool:
        """In the writer's transaction: the reason still applies (it may have been lifted)."""

    def hold_done(self, result: HoldResult) -> None:
        """The hold was committed (or found stale or gone)."""


class BounceCheck(Protocol):
    """What decides that a due job is bounced (an operator's rule, mta.queue.rules)."""

    def bounce_reason(self, item: Item) -> str | None:
        """The bounce's reply text, or None (cheap: asked for every item)."""

    def still_bounces(self, txn: Any, item: Item) -> bool:
        """In the writer's transaction: the rule still applies."""


class AccountPace(Protocol):
    """Per-account rates (mta.throttle.account_pace.AccountPaces)."""

    def __bool__(self) -> bool: ...

    def paced(self, account: str, campaign: str) -> bool: ...

    async def reserve(self, account: str, campaign: str) -> float:
        """Seconds until the next message of `account` and `campaign` may go; the turn
        is taken."""


class Scheduler:
    def __init__(self, spool: Spool, committer: GroupCommitter, cfg: DeliveryConfig,
                 index: int, workers: int, on_outcome: Callable[[Item, AttemptOutcome], None],
                 build_dsn: DsnBuilder, hold_check: HoldCheck | None = None,
                 windows: Windows | None = None,
                 bounce_check: BounceCheck | None = None,
                 pace: AccountPace | None = None,
                 record_events: OutcomeRecorder | None = None,
                 intake_first: IntakeFirst | None = None) -> None:
        self.spool = spool
        self.committer = committer
        self.cfg = cfg
        self.index, self.workers = index, workers
        self.on_outcome = on_outcome
        self.build_dsn = build_dsn
        self.hold_check = hold_check
        self.windows = windows or Windows([])
        self.bounce_check = bounce_check  # an operator's bounce rule: its reason, or None
        self.pace = pace  # per-account rates: each message waits for its turn
        self.record_events = record_events  # an outcome's events, in its transaction
        self.intake_first = intake_first  # bulk delivery yields to a busy intake
        self._turns: dict[bytes, float] = {}  # job id -> its reserved turn (time.time())
        self._dispatch: Dispatch | None = None
        self.in_flight: set[bytes] = set()
        self._settling = 0  # of those, sent and waiting for their outcome's commit
        self._refill_at = -1  # a capped scan left work: scan again once delivering is down here
        self._wakeup = asyncio.Event()
        self._resume_ms = 0
        self._last_full_scan = 0.0
        self._task: asyncio.Task[None] | None = None
        self.paused = False
        self._background_tasks: set[asyncio.Task[Any]] = set()

    def owns(self, domain: str) -> bool:
        return domain_hash(domain) % self.workers == self.index

    def wake(self) -> None:
        self._wakeup.set()

    def notify_stored(self, message: NewMessage) -> None:
        """Intake stored a message: look at once if any of its domains is ours."""
        if self.intake_first is not None:
            self.intake_first.stored()
        if any(self.owns(r.rpartition("@")[2].lower()) for r in message.recipients):
            self._wakeup.set()

    def start(self, dispatch: Dispatch) -> None:
        """Start handing due items to `dispatch` (delivery)."""
        self._dispatch = dispatch
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop scanning; the outcomes already known are committed and announced (they
        wait for a commit to join, mta.queue.commit) before delivery is cancelled."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            await self.committer.flush()
        except Exception:
            log.exception("could not commit the last outcomes")

    async def _run(self) -> None:
        while True:
            try:
                next_due = self.scan()
            except Exception:
                log.exception("scheduler scan failed")
                next_due = None
            timeout = POLL_INTERVAL
            # A due time already past belongs to a job in flight (or another worker's):
            # waiting for it would spin; the poll finds it when it becomes due again.
            if next_due is not None and next_due / 1000 > time.time():
                timeout = min(timeout, next_due / 1000 - time.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()
            self._wakeup.clear()

    def scan(self) -> int | None:
        """Dispatch due jobs up to capacity, the transactional lane's first (bulk never
        takes the last `transactional_slots`); the next due time (ms) seen, if any."""
        if self.paused:
            return None
        capacity = self.cfg.max_concurrent_deliveries - len(self.in_flight)
        if capacity <= 0:
            return None
        now = time.time()
        now_ms = int(now * 1000)
        if now - self._last_full_scan >= FULL_RESCAN_INTERVAL:
            start_ms, self._last_full_scan = 0, now
        else:
            start_ms = max(0, self._resume_ms - RESCAN_MARGIN_MS)
        reserve = min(self.cfg.transactional_slots, self.cfg.max_concurrent_deliveries // 2)
        with self.spool.read() as txn:
            messages: dict[str, dict[str, Any]] = {}
            items, _ = self._collect(txn, now, b"", capacity, messages, transactional=True)
            room = capacity - len(items) - reserve
            gated = self._bulk_room(room)
            if gated > 0:  # else the bulk scan resumes where it was, next time
                bulk, last_ms = self._collect(txn, now, struct.pack(">Q", start_ms), gated,
                                              messages)
                items += bulk
                self._resume_ms = last_ms or now_ms
                self._refill_at = self.delivering() // 2 if last_ms and gated < room else -1
        if items:
            self._background(self._start(items))
        return None if items else self._next_due_ms()

    def delivering(self) -> int:
        """Items in flight that are still being delivered: not those only waiting for
        their outcome's commit (a lazy one, up to 50 ms: mta.queue.commit), which take no
        more work and are not counted against a depth cap."""
        return len(self.in_flight) - self._settling

    def _refill_if_low(self) -> None:
        """The last scan stopped at intake first's depth cap and half of what it left
        delivering is done: scan now, not at the next poll, so that the capped depth stays
        filled as intake stops. Not while intake is active: there the cap is also a pace."""
        if 0 <= self.delivering() <= self._refill_at and not (
                self.intake_first is not None and self.intake_first.intake_active()):
            self._refill_at = -1
            self._wakeup.set()

    def _bulk_room(self, room: int) -> int:
        """`room`, or less while bulk delivery yields to a busy intake."""
        gate = self.intake_first.bulk_room(self.delivering()) if self.intake_first else None
        return room if gate is None else min(room, gate)

    def _collect(self, txn: Any, now: float, start: bytes, capacity: int,
                 messages: dict[str, dict[str, Any]], transactional: bool = False
                 ) -> tuple[list[Item], int]:
        """Due items of one lane, up to `capacity`, marked in flight; and the due time
        where the scan stopped for lack of capacity (0: it did not)."""
        items: list[Item] = []
        for _, when, job_id in self.spool.due(txn, int(now * 1000), start,
                                              (self.index, self.workers), transactional,
                                              skip=self.in_flight):
            job = self.spool.get_job(txn, job_id)
            if job is None:
                continue
            message = messages.get(job.msg) or self.spool.get_message(txn, job.msg)
            if message is None:
                continue
            messages[job.msg] = message
            self.in_flight.add(job_id)
            items.append(Item(job, message, now, self.spool.is_sending(txn, job_id)))
            if len(items) >= capacity:
                return items, when
        return items, 0

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background_tasks.add(task)
        task.add_done_callback(self._background_tasks.discard)

    async def _start(self, items: list[Item]) -> None:
        """Hold what the hold check holds; mark the rest as being sent (so that a crash
        mid-send is known), then hand them to delivery."""
        to_send = [item for item in items if not self.take_held(item)
                   and not self.take_bounced(item) and not self.outside_window(item)]
        if self.pace:
            to_send = [item for item in to_send if not await self.take_paced(item)]
        if not to_send:
            return
        try:
            await self.committer.submit(
                lambda txn: self.spool.mark_sending(txn, [item.job_id for item in to_send]))
        except Exception:
            log.exception("could not mark jobs as sending; retrying them later")
            for item in to_send:
                self.in_flight.discard(item.job_id)
            return
        assert self._dispatch is not None
        for item in to_send:
            self._dispatch(item)

    def take_held(self, item: Item) -> bool:
        """True when the hold check keeps this item from being sent: its job is held (in
        the background) and the scheduler forgets the item. Asked again by delivery just
        before sending, since an item may wait at a destination's pace meanwhile."""
        reason = self.hold_check.hold_reason(item) if self.hold_check is not None else None
        if reason is None:
            return False
        self._background(self.hold(item, reason))
        return True

    def take_bounced(self, item: Item) -> bool:
        """True when an operator's bounce rule matches the item: its waiting recipients
        are bounced (a DSN, Bounce events) in the background, as a refusal would be."""
        check = self.bounce_check
        reason = check.bounce_reason(item) if check is not None else None
        if check is None or reason is None:
            return False
        results = [RcptResult(rcpt, 550, reason, "5.7.0") for rcpt in item.job.waiting()]
        self._background(self.complete(  # unless the rule was lifted meanwhile
            item, results, only_if=lambda txn: check.still_bounces(txn, item)))
        return True

    async def take_paced(self, item: Item) -> bool:
        """True when the item's account is over its pace: its turn is reserved and the
        job put back, due at that turn (no attempt counted); picked up then, it goes."""
        assert self.pace is not None
        account, campaign = item.job.account, item.job.campaign
        message = item.message
        if (not self.pace.paced(account, campaign) or message.get("dsn_for")
                or message.get("notice")):
            return False
        now = time.time()
        turn = self._turns.pop(item.job_id, None)
        if turn is not None and turn <= now + PACE_SLACK:
            return False
        wait = await self.pace.reserve(account, campaign)
        if wait <= PACE_SLACK:
            return False
        if len(self._turns) > MAX_TURNS:  # turns of jobs held or removed meanwhile
            self._turns = {k: t for k, t in self._turns.items() if t > now}
        self._turns[item.job_id] = now + wait
        self._background(self.postpone(item, wait))
        return True

    def outside_window(self, item: Item) -> bool:
        """True when the item's campaign is outside its delivery windows: the job is
        pushed (in the background, no attempt counted) to the next window start."""
        if not self.windows:
            return False
        job = item.job
        start = self.windows.next_open(job.account, job.campaign, time.time())
        if start is None:
            return False
        self._background(self.postpone(item, start - time.time()))
        return True

    async def hold(self, item: Item, reason: str) -> HoldResult:
        """Keep a due job out of delivery (not lost, not bounced) until it is released."""
        check = self.hold_check

        def hold(txn: Any) -> HoldResult:
            job = self.spool.get_job(txn, item.job_id)
            if job is None or job.held:
                return HoldResult.GONE
            if check is not None and not check.still_holds(txn, job, reason):
                if self.spool.is_sending(txn, job.id):  # held at dispatch: not sent either
                    self.spool.save_attempt(txn, job, job.next_ms)
                return HoldResult.STALE  # stays due: it goes out at the next scan
            self.spool.hold_job(txn, job, reason)
            return HoldResult.HELD

        try:
            result: HoldResult = await self.committer.submit(hold)
        finally:
            self.in_flight.discard(item.job_id)
        if check is not None:
            check.hold_done(result)
        return result

    async def postpone(self, item: Item, seconds: float) -> None:
        """Put a job back, due in `seconds`, without counting an attempt (it was not tried:
        its destination is suspended or over its pace)."""
        due_ms = int((time.time() + max(0.0, seconds)) * 1000)

        def move(txn: Any) -> None:
            job = self.spool.get_job(txn, item.job_id)
            if job is not None and not job.held:
                old = job.next_ms
                job.next_ms = due_ms
                self.spool.save_attempt(txn, job, old)

        try:
            await self.committer.submit(move)
        finally:
            self.in_flight.discard(item.job_id)

    def _next_due_ms(self) -> int | None:
        with self.spool.read() as txn:
            return self.spool.next_due_ms(txn)

    # --- outcomes ----------------------------------------------------------

    async def complete(self, item: Item, results: list[RcptResult],
                       retry_after: float | None = None,
                       only_if: Callable[[Any], bool] | None = None) -> AttemptOutcome | None:
        """Record an attempt's results durably, then release the job. With `only_if`,
        only when it holds in the writer's transaction (else the job stays as it was)."""
        now_ms = int(time.time() * 1000)

        def record(txn: Any) -> AttemptOutcome | None:
            if only_if is not None and not only_if(txn):
                return None
            outcome = self._record(txn, item, results, now_ms, retry_after)
            if outcome is not None and self.record_events is not None:
                self.record_events(txn, item, outcome)
            return outcome

        self._settling += 1  # still in flight (not scanned again), no longer delivering
        self._refill_if_low()
        try:  # lazy: it joins intake's next commit (mta.queue.commit); lost in a crash,
            # the job is still there, marked as being sent: delivered again, never lost
            outcome = await self.committer.submit(record, lazy=True)
        except Exception:
            log.exception("could not record the outcome of %s", item.job_id)
            outcome = None
        finally:
            self._settling -= 1
            self.in_flight.discard(item.job_id)
        if outcome is not None:
            self.on_outcome(item, outcome)
            if outcome.next_attempt_ms is not None and outcome.next_attempt_ms <= now_ms + 1000:
                self.wake()
        return outcome

    def _record(self, txn: Any, item: Item, results: list[RcptResult], now_ms: int,
                retry_after: float | None) -> AttemptOutcome | None:
        """Runs in the spool writer thread: only the transaction and plain data here."""
        job = self.spool.get_job(txn, item.job_id)
        if job is None or job.held:
            return None  # removed or held by an operator meanwhile
        old_next = job.next_ms
        outcome = apply_attempt(
            job, results, now_ms, _queued_ms(item.message), self.cfg.max_age,
            (self.cfg.retry_initial, self.cfg.retry_max, self.cfg.retry_jitter), retry_after)
        if outcome.bounced:
            self._store_dsn(txn, item, outcome.bounced, expired=False)
        if outcome.expired:
            self._store_dsn(txn, item, outcome.expired, expired=True)
        if outcome.next_attempt_ms is None:
            self.spool.remove_job(txn, job)
        else:
            job.next_ms = outcome.next_attempt_ms
            self.spool.save_attempt(txn, job, old_next)
        item.job = job
        return outcome

    def _store_dsn(self, txn: Any, item: Item, failed: list[RcptResult], expired: bool) -> None:
        dsn = self.build_dsn(item.message, failed, expired)
        if dsn is not None:
            self.spool.put_message(txn, dsn)


def _queued_ms(message: dict[str, Any]) -> int:
    """When a message's time in the queue starts (for [delivery] max_age): its send time
    when it has one, else its arrival."""
    return int(max(message["received"], message.get("send_at", 0.0)) * 1000)
