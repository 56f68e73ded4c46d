"""Intake first: bulk delivery yields to a busy intake, for a bounded time.

While a worker's intake stores mail and its event loop is CPU-bound (the loop's thread
running or waiting for a CPU at least `BUSY_SHARE` of the time, from the kernel's
scheduler statistics), every bulk delivery it starts delays the 250s that its clients
wait for. Bulk delivery then takes no new work for `[delivery] yield_to_intake` seconds
(or until intake pauses `PAUSE`), then takes work again for `deliver_between_yields`
seconds, and so on while the pressure lasts: clients get their replies at intake's
speed, the spool keeps what they send (as Postfix's smtpd processes accept ahead of its
queue manager), and delivery keeps a share of the time however long clients go on
sending. From the first yield until intake stops (`STOPPED` without a message: the
episode), delivery goes no deeper than when that yield began, and at least `RUN_DEPTH`
deep: the backlog taken at once would starve intake in turn, and a yield only stops new
work. While the loop has CPU to spare in an episode (`SPARE_SHARE`), that depth grows
a step a tick.
The transactional lane never yields, and deliveries already under way go on.

A yield is repeated only while it is used: if intake stored no faster while bulk
delivery yielded (`USED`), what kept the loop busy was delivery itself, not intake (a
client trickling mail into a worker busy with a backlog), or intake stopped, and bulk
delivery does not yield again for `QUIET` seconds; a yield that intake's pause ended
within `JUDGED_AFTER` is not judged. Where the kernel does not say (no
/proc/thread-self/schedstat), nothing yields.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BUSY_SHARE = 0.8  # of the time running or waiting for a CPU: the loop is CPU-bound
SPARE_SHARE = 0.5  # below this the loop has CPU to spare: the depth cap may grow
INTAKE_RECENT = 0.1  # seconds since intake stored a message: intake is active
PAUSE = 0.1  # seconds without a message stored that end a yield: intake paused
# ... and that lift the depth between yields: intake stopped. Longer: a short pause lifts
# it, delivery takes the whole backlog at once (thousands in flight) and, when intake
# comes back, starves it until they are done (a yield only stops new work)
STOPPED = 0.3
USED = 1.2  # a yield is used if intake stores this many times faster during it
QUIET = 30.0  # seconds without yields after a yield that intake did not use
JUDGED_AFTER = 1.0  # a yield that intake's pause ended sooner is not judged (too short)
RATE_WINDOW = 1.0  # intake's rate before a yield is measured over about this long
MARK_EVERY = 0.1  # seconds between the (time, count) marks intake's rate is taken from
RUN_DEPTH = 20  # bulk items in flight at most between two yields, or as many as before
TICK = 0.05  # seconds between readings of the loop thread's scheduler statistics
SMOOTHING = 0.5  # weight of the newest reading in the running busy share
SCHEDSTAT = Path("/proc/thread-self/schedstat")


def busy_ns(text: str) -> int:
    """Nanoseconds running plus waiting for a CPU, from a schedstat line
    ("<on CPU ns> <waiting ns> <timeslices>")."""
    running, waiting = text.split()[:2]
    return int(running) + int(waiting)


class LoopBusy:
    """The share of time the event loop's thread was running or waiting for a CPU (not
    asleep waiting for I/O), read every `tick` from its scheduler statistics."""

    def __init__(self, read: Callable[[], str] = SCHEDSTAT.read_text,
                 clock: Callable[[], float] = time.monotonic, tick: float = TICK) -> None:
        self.read = read
        self.clock = clock
        self.tick = tick
        self.share = 0.0  # smoothed over the last few ticks
        self.known = False
        self._last: tuple[int, float] | None = None
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.sample()
        if self.known:
            self._handle = asyncio.get_running_loop().call_later(self.tick, self._again)

    async def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _again(self) -> None:
        self.sample()
        self._handle = asyncio.get_running_loop().call_later(self.tick, self._again)

    def total(self) -> tuple[int, float] | None:
        """(busy ns, clock) now; None when the kernel does not say."""
        try:
            return busy_ns(self.read()), self.clock()
        except (OSError, ValueError):
            return None

    def sample(self) -> None:
        now = self.total()
        self.known = now is not None
        if now is None:
            self.share, self._last = 0.0, None
            return
        if self._last is not None:
            self.share += SMOOTHING * (share_between(self._last, now) - self.share)
        self._last = now


def share_between(before: tuple[int, float], after: tuple[int, float]) -> float:
    """The busy share between two (busy ns, clock) readings, within 0..1."""
    elapsed = after[1] - before[1]
    if elapsed <= 0:
        return 0.0
    return min(1.0, max(0.0, (after[0] - before[0]) / 1e9 / elapsed))


class IntakeFirst:
    """How much new work bulk delivery may take now (`bulk_room`)."""

    def __init__(self, loop_busy: LoopBusy, yield_for: float, run_for: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.loop_busy = loop_busy
        self.yield_for = yield_for
        self.run_for = run_for
        self.clock = clock
        self.yields = 0  # how many times bulk delivery yielded (for tests and metrics)
        self.stored_count = 0
        self._stored_at = float("-inf")
        self._marks: deque[tuple[float, int]] = deque()  # (time, stored_count), 1 s back
        self._yield: Yield | None = None
        self._run_until = float("-inf")
        self._run_depth = RUN_DEPTH
        self._deepened_at = float("-inf")
        self._episode = False  # from the first yield until intake stops
        self._quiet_until = float("-inf")

    def stored(self) -> None:
        """This worker's intake stored a message."""
        self._stored_at = self.clock()
        self.stored_count += 1

    def bulk_room(self, in_flight: int) -> int | None:
        """How many more bulk items delivery may take now: None for no limit of this
        gate's, 0 while it yields, else what the episode's depth leaves (module doc)."""
        if self.yield_for <= 0:
            return None
        now = self.clock()
        if self._yield is not None:
            if now < self._yield.until and now - self._stored_at < PAUSE:
                return 0
            self._end_yield(now)
        self._mark(now)
        if self._episode and now - self._stored_at >= STOPPED:
            self._episode = False  # intake stopped
        pressed = self._pressed(now)
        if not self._episode:
            if not pressed or now < self._quiet_until:
                return None
            self._episode = True
            self._run_depth = max(RUN_DEPTH, in_flight)
            return self._start_yield(now)
        if pressed and now >= self._run_until and now >= self._quiet_until:
            return self._start_yield(now)
        if self.loop_busy.share < SPARE_SHARE and now - self._deepened_at >= MARK_EVERY:
            self._run_depth = max(self._run_depth, in_flight) + RUN_DEPTH
            self._deepened_at = now
        return max(0, self._run_depth - in_flight)

    def _start_yield(self, now: float) -> int:
        self._yield = Yield(now, now + self.yield_for, self.stored_count, self._recent_rate(now))
        self.yields += 1
        return 0

    def intake_active(self, now: float | None = None) -> bool:
        """This worker's intake stored a message within the last `INTAKE_RECENT`."""
        return (self.clock() if now is None else now) - self._stored_at < INTAKE_RECENT

    def _pressed(self, now: float) -> bool:
        return (self.intake_active(now) and self.loop_busy.known
                and self.loop_busy.share >= BUSY_SHARE)

    def _mark(self, now: float) -> None:
        marks = self._marks
        if not marks or now - marks[-1][0] >= MARK_EVERY:
            marks.append((now, self.stored_count))
        while len(marks) > 1 and now - marks[1][0] >= RATE_WINDOW:
            marks.popleft()

    def _recent_rate(self, now: float) -> float:
        """Messages stored per second over about the last `RATE_WINDOW`."""
        since, count = self._marks[0]
        return (self.stored_count - count) / (now - since) if now > since else 0.0

    def _end_yield(self, now: float) -> None:
        """Delivery takes work again for `run_for`, no deeper than before. If intake
        stored no faster during a yield of `JUDGED_AFTER` or more, the yield was not
        what intake needed (or intake stopped): no yield for `QUIET`. A shorter one
        (clients that pause as they connect, or a burst that ends) says too little."""
        done, self._yield = self._yield, None
        assert done is not None
        self._run_until = now + self.run_for
        self._marks.clear()
        lasted = now - done.start
        rate = (self.stored_count - done.count) / max(lasted, MARK_EVERY)
        if lasted >= JUDGED_AFTER and rate < USED * done.rate_before:
            self._quiet_until = now + QUIET


@dataclass(frozen=True, slots=True)
class Yield:
    start: float
    until: float
    count: int  # intake's stored_count when it started
    rate_before: float  # messages stored per second just before
