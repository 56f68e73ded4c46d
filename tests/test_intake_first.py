"""Intake first: bulk delivery yields to a busy intake for a bounded time, then delivers
between yields; never when intake is idle, the loop has CPU to spare, the kernel does not
say, or a yield did not help intake. Units with a fake clock, then the scheduler on a
real spool: a yielding gate keeps bulk jobs back and lets transactional ones go; items
waiting for their outcome's commit do not count against the depth, and once half the
depth is done a scan comes at once (not at the next poll) unless intake is active."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mta.config import ConfigError, DeliveryConfig, load_config
from mta.queue.commit import LAZY_DELAY, GroupCommitter
from mta.queue.intake_first import (
    INTAKE_RECENT,
    JUDGED_AFTER,
    PAUSE,
    QUIET,
    RUN_DEPTH,
    STOPPED,
    IntakeFirst,
    LoopBusy,
    busy_ns,
)
from mta.queue.lanes import TRANSACTIONAL
from mta.queue.outcome import RcptResult
from mta.queue.scheduler import Item, Scheduler
from mta.queue.spool import NewMessage, Spool

YIELD_FOR, RUN_FOR = 4.0, 1.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Schedstat:
    """A thread's /proc/thread-self/schedstat whose busy time the test sets."""

    def __init__(self) -> None:
        self.busy_ns = 0

    def read(self) -> str:
        return f"{self.busy_ns} 0 7\n"


def _gate(busy: float = 1.0) -> tuple[IntakeFirst, Clock, LoopBusy]:
    clock = Clock()
    loop_busy = LoopBusy(read=lambda: "5 0 1", clock=clock)
    loop_busy.known, loop_busy.share = True, busy
    return IntakeFirst(loop_busy, YIELD_FOR, RUN_FOR, clock=clock), clock, loop_busy


def _intake(gate: IntakeFirst, clock: Clock, seconds: float, rate: float) -> set[int | None]:
    """Intake stores `rate` messages a second for `seconds`; the scheduler asks the gate
    every 50 ms meanwhile. What the gate answered."""
    answers: set[int | None] = set()
    ask_every = max(1, int(rate * 0.05))
    for n in range(int(seconds * rate)):
        clock.now += 1 / rate
        gate.stored()
        if n % ask_every == 0:
            answers.add(gate.bulk_room(0))
    return answers


def test_busy_share_comes_from_the_schedstat_readings() -> None:
    assert busy_ns("123 456 7\n") == 579
    clock, stat = Clock(), Schedstat()
    loop_busy = LoopBusy(read=stat.read, clock=clock)
    loop_busy.sample()
    assert loop_busy.known and loop_busy.share == 0.0
    for _ in range(20):  # running 90 % of the time
        clock.now += 0.05
        stat.busy_ns += 45_000_000
        loop_busy.sample()
    assert loop_busy.share == pytest.approx(0.9, abs=0.01)

    def missing() -> str:
        raise FileNotFoundError("/proc/thread-self/schedstat")

    unknown = LoopBusy(read=missing, clock=clock)
    unknown.sample()
    assert not unknown.known and unknown.total() is None


def test_bulk_yields_to_a_busy_intake_then_delivers_between_yields() -> None:
    gate, clock, loop_busy = _gate(busy=0.5)
    assert _intake(gate, clock, 1.0, 1000) == {None}  # the loop has CPU to spare
    loop_busy.share = 1.0
    assert gate.bulk_room(5) == 0 and gate.yields == 1
    assert _intake(gate, clock, YIELD_FOR - 0.5, 3000) == {0}  # intake runs faster
    clock.now += 0.6
    gate.stored()
    assert gate.bulk_room(5) == RUN_DEPTH - 5  # between yields, not at full depth
    assert gate.bulk_room(RUN_DEPTH + 5) == 0
    clock.now += RUN_FOR
    gate.stored()
    assert gate.bulk_room(0) == 0 and gate.yields == 2  # pressed still: yields again
    clock.now += YIELD_FOR
    gate.stored()
    assert gate.bulk_room(0) == RUN_DEPTH - 0  # the episode's depth, as at its start


def test_between_yields_delivery_goes_as_deep_as_before_the_first() -> None:
    """Deliveries waiting on remote servers: as many stay in flight between yields."""
    gate, clock, loop_busy = _gate(busy=0.5)
    _intake(gate, clock, 1.0, 1000)
    loop_busy.share = 1.0
    assert gate.bulk_room(900) == 0
    _intake(gate, clock, YIELD_FOR + 0.1, 3000)
    assert gate.bulk_room(700) == 200


def test_a_yield_ends_when_intake_pauses() -> None:
    gate, clock, loop_busy = _gate(busy=0.5)
    _intake(gate, clock, 1.0, 1000)
    loop_busy.share = 1.0
    assert _intake(gate, clock, 1.0, 3000) == {0}
    clock.now += PAUSE / 2
    assert gate.bulk_room(0) == 0  # a gap between two messages is no pause
    clock.now += PAUSE
    assert 0 < gate.bulk_room(0) <= 2 * RUN_DEPTH  # the yield ended (intake paused): capped
    clock.now += STOPPED
    assert gate.bulk_room(0) is None and gate.yields == 1  # intake stopped: full depth
    gate.stored()
    assert gate.bulk_room(0) == 0 and gate.yields == 2  # intake again, the loop busy


def test_no_yield_without_both_intake_and_a_cpu_bound_loop() -> None:
    gate, clock, loop_busy = _gate(busy=0.5)
    assert _intake(gate, clock, 2.0, 1000) == {None}  # the loop has CPU to spare
    loop_busy.share = 1.0
    clock.now += 2 * INTAKE_RECENT
    assert gate.bulk_room(0) is None  # intake is idle
    loop_busy.known = False
    assert _intake(gate, clock, 1.0, 1000) == {None}  # the kernel does not say
    off = IntakeFirst(loop_busy, 0.0, RUN_FOR, clock=clock)
    loop_busy.known = True
    assert _intake(off, clock, 1.0, 1000) == {None}  # yield_to_intake = 0
    assert gate.yields == off.yields == 0


def test_a_yield_that_intake_did_not_use_is_not_repeated_for_a_while() -> None:
    """A client trickling mail into a worker busy with its backlog: the loop is busy with
    delivery, and yielding does not make intake any faster."""
    gate, clock, loop_busy = _gate(busy=0.5)
    _intake(gate, clock, 1.0, 20)
    loop_busy.share = 1.0
    assert _intake(gate, clock, YIELD_FOR - 0.1, 20) == {0}
    assert _intake(gate, clock, 0.2, 20) == {0, RUN_DEPTH}
    assert _intake(gate, clock, RUN_FOR + 0.2, 20) == {RUN_DEPTH}
    # though pressed, no yield: only the depth between yields holds while intake goes on
    assert _intake(gate, clock, QUIET - RUN_FOR - 0.6, 20) == {RUN_DEPTH}
    assert gate.yields == 1
    assert 0 in _intake(gate, clock, 1.0, 20) and gate.yields == 2


def test_a_short_yield_that_intake_paused_is_not_judged() -> None:
    """Clients that pause as they connect end the first yield at once: that says nothing
    of whether yielding helps, and must not stop yields for the next 30 s."""
    gate, clock, loop_busy = _gate(busy=0.5)
    _intake(gate, clock, 1.0, 1000)
    loop_busy.share = 1.0
    assert _intake(gate, clock, JUDGED_AFTER / 2, 1000) == {0}
    clock.now += PAUSE  # the pause ends the yield, shorter than JUDGED_AFTER
    assert 0 < gate.bulk_room(0) <= 2 * RUN_DEPTH and gate.yields == 1
    clock.now += RUN_FOR
    assert 0 in _intake(gate, clock, 0.5, 1000) and gate.yields == 2  # pressed: yields again


def test_while_intake_goes_on_the_depth_grows_only_a_step_a_tick() -> None:
    """Pressure that lets up for a moment must not let delivery take the whole backlog
    at once: when intake came back, it would starve (a yield only stops new work)."""
    gate, clock, loop_busy = _gate(busy=0.5)
    _intake(gate, clock, 1.0, 1000)
    loop_busy.share = 1.0
    assert gate.bulk_room(0) == 0 and gate.yields == 1
    _intake(gate, clock, YIELD_FOR + 0.1, 3000)
    loop_busy.share = 0.6  # not CPU-bound, but not idle either: the cap holds
    assert _intake(gate, clock, 0.5, 1000) == {RUN_DEPTH}
    loop_busy.share = 0.3  # CPU to spare
    rooms = _intake(gate, clock, 1.0, 1000)
    assert None not in rooms and RUN_DEPTH * 5 < max(rooms) <= RUN_DEPTH * 12
    clock.now += STOPPED + 0.01
    assert gate.bulk_room(0) is None  # intake stopped: the episode is over


def test_delivery_settings_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "mta.toml"
    for setting in ("yield_to_intake = -1.0", "deliver_between_yields = 0.0"):
        path.write_text(f"[delivery]\n{setting}\n")
        with pytest.raises(ConfigError, match=setting.split()[0]):
            load_config(path)
    path.write_text("[delivery]\nyield_to_intake = 0.0\n")
    assert load_config(path).delivery.yield_to_intake == 0.0


def _spool(tmp_path: Path, lazy_delay: float = LAZY_DELAY) -> tuple[Spool, GroupCommitter]:
    spool = Spool(tmp_path / "spool", 64 * 1024**2)
    committer = GroupCommitter(spool, lazy_delay=lazy_delay)
    committer.start()
    return spool, committer


def _scheduler(spool: Spool, committer: GroupCommitter, gate: IntakeFirst) -> Scheduler:
    return Scheduler(spool, committer, DeliveryConfig(), 0, 1,
                     on_outcome=lambda item, outcome: None,
                     build_dsn=lambda message, failed, expired: None, intake_first=gate)


@pytest.mark.asyncio
async def test_the_scheduler_holds_bulk_back_while_it_yields(tmp_path: Path) -> None:
    spool, committer = _spool(tmp_path)
    gate, clock, _ = _gate()
    scheduler = _scheduler(spool, committer, gate)
    dispatched: asyncio.Queue[Item] = asyncio.Queue()
    bulk = NewMessage("s@shop.test", ["a@x.test"], b"Subject: b\r\n\r\nx\r\n")
    fast = NewMessage("s@shop.test", ["b@x.test"], b"Subject: t\r\n\r\nx\r\n",
                      lane=TRANSACTIONAL)
    try:
        _intake(gate, clock, 1.0, 1000)
        assert gate.bulk_room(0) == 0 and gate.yields == 1  # yielding from now on
        spool.apply([spool.store_op(bulk), spool.store_op(fast)])
        scheduler.notify_stored(fast)
        scheduler.start(dispatched.put_nowait)
        async with asyncio.timeout(10):
            first = await dispatched.get()
        assert first.job.msg == fast.id
        scheduler.scan()
        assert scheduler.in_flight == {f"{fast.id}.0".encode()}  # bulk stays back
        clock.now += PAUSE + 0.01  # intake paused: the yield ends
        scheduler.wake()
        async with asyncio.timeout(10):
            second = await dispatched.get()
        assert second.job.msg == bulk.id
    finally:
        await scheduler.stop()
        await committer.close()
        spool.close()


async def _capped_run(tmp_path: Path, busy: float, intake_goes_on: bool) -> bool:
    """Thirty due messages; the gate has yielded to intake and intake paused: delivery
    goes 20 deep (`RUN_DEPTH`). Ten of the twenty are sent and wait for their outcome's
    commit (held back: lazy operations commit with the next urgent one). The next ten go
    out all the same (they would wait for those commits if the ten counted against the
    depth); whether the ten called for a scan at once."""
    spool, committer = _spool(tmp_path, lazy_delay=600.0)
    gate, clock, loop_busy = _gate()
    scheduler = _scheduler(spool, committer, gate)
    dispatched: asyncio.Queue[Item] = asyncio.Queue()
    messages = [NewMessage("s@shop.test", [f"r{n}@x.test"], b"Subject: b\r\n\r\nx\r\n")
                for n in range(30)]
    outcomes: list[asyncio.Task[object]] = []
    try:
        _intake(gate, clock, 1.0, 1000)
        assert gate.bulk_room(0) == 0  # yielding
        spool.apply([spool.store_op(m) for m in messages])
        clock.now += PAUSE + 0.05  # intake paused (not stopped): the yield ends, depth 20
        scheduler.start(dispatched.put_nowait)
        async with asyncio.timeout(10):
            first = [await dispatched.get() for _ in range(RUN_DEPTH)]
        loop_busy.share = busy
        if intake_goes_on:
            gate.stored()
        outcomes = [asyncio.create_task(scheduler.complete(
            item, [RcptResult(item.job.waiting()[0], 250, "ok", "2.0.0")])) for item in first[:10]]
        async with asyncio.timeout(10):
            while scheduler.delivering() > RUN_DEPTH - 10:
                await asyncio.sleep(0)
        woken = scheduler._wakeup.is_set()  # before the scheduler's task runs again
        async with asyncio.timeout(10):  # the next ten, while the ten outcomes still wait
            for _ in range(10):
                await dispatched.get()
        return woken
    finally:
        await committer.flush()
        await asyncio.gather(*outcomes)
        await scheduler.stop()
        await committer.close()
        spool.close()


@pytest.mark.asyncio
async def test_outcomes_waiting_for_their_commit_leave_room_and_call_a_scan(
        tmp_path: Path) -> None:
    assert await _capped_run(tmp_path, busy=1.0, intake_goes_on=False)  # not the poll's


@pytest.mark.asyncio
async def test_no_early_scan_while_intake_is_active(tmp_path: Path) -> None:
    """Intake active on a loop with CPU to spare (no yield): the next poll fills the
    depth, no early scan."""
    assert not await _capped_run(tmp_path, busy=0.0, intake_goes_on=True)


@pytest.mark.asyncio
async def test_loop_busy_reads_on_a_timer_until_closed() -> None:
    stat = Schedstat()
    readings: list[int] = []

    def read() -> str:
        readings.append(stat.busy_ns)
        return stat.read()

    loop_busy = LoopBusy(read=read, tick=0.001)
    loop_busy.start()
    async with asyncio.timeout(10):
        while len(readings) < 3:
            await asyncio.sleep(0.001)
    await loop_busy.close()
    count = len(readings)
    for _ in range(5):
        await asyncio.sleep(0.002)
    assert loop_busy.known and len(readings) == count
