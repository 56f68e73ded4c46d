"""Job states owned by mta.queue: records, holds and releases, the `sending` marker.

A real LMDB spool and the real scheduler; delivery is a list that collects what the
scheduler dispatches.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mta.config import DeliveryConfig
from mta.queue import jobs
from mta.queue.commit import GroupCommitter
from mta.queue.jobs import HoldResult, Job, JobState, RcptState, Recipient
from mta.queue.outcome import RcptResult
from mta.queue.scheduler import Item, Scheduler
from mta.queue.spool import NewMessage, Spool, pack, unpack

REASON = "campaign:shop/spring"


@dataclass
class Holds:
    """A hold check that holds what it is told to."""

    holding: set[str] = field(default_factory=set)
    results: list[HoldResult] = field(default_factory=list)

    def hold_reason(self, item: Item) -> str | None:
        return REASON if item.message["campaign"] in self.holding else None

    def still_holds(self, txn: Any, job: Job, reason: str) -> bool:
        return job.campaign in self.holding

    def hold_done(self, result: HoldResult) -> None:
        self.results.append(result)


@dataclass
class Rig:
    spool: Spool
    committer: GroupCommitter
    scheduler: Scheduler
    holds: Holds
    dispatched: asyncio.Queue[Item]

    def store(self, rcpts: list[str], campaign: str = "spring") -> NewMessage:
        message = NewMessage("news@shop.test", rcpts, b"Subject: x\r\n\r\nhi\r\n", "shop",
                             campaign)
        assert self.spool.apply([self.spool.store_op(message)]) == [message.id]
        return message

    async def next_dispatched(self) -> Item:
        self.scheduler.wake()
        async with asyncio.timeout(10):
            return await self.dispatched.get()

    def job(self, job_id: bytes) -> Job | None:
        with self.spool.read() as txn:
            return self.spool.get_job(txn, job_id)

    def sending(self, job_id: bytes) -> bool:
        with self.spool.read() as txn:
            return self.spool.is_sending(txn, job_id)


@asynccontextmanager
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    spool = Spool(tmp_path / "spool", 64 * 1024**2)
    committer = GroupCommitter(spool)
    committer.start()
    holds = Holds()
    scheduler = Scheduler(spool, committer, DeliveryConfig(), 0, 1,
                          on_outcome=lambda item, outcome: None,
                          build_dsn=lambda message, failed, expired: None, hold_check=holds)
    dispatched: asyncio.Queue[Item] = asyncio.Queue()
    scheduler.start(dispatched.put_nowait)
    try:
        yield Rig(spool, committer, scheduler, holds, dispatched)
    finally:
        await scheduler.stop()
        await committer.close()
        spool.close()


def test_a_job_record_reads_and_writes_the_spool_layout() -> None:
    record = {"msg": "M1", "domain": "d.test", "account": "shop", "campaign": "c",
              "rcpts": [["a@d.test", "queued", None, None], ["b@d.test", "delivered", 250, "ok"]],
              "attempts": 1, "next": 5, "first": 2, "error": None}
    job = Job.from_record(b"M1.0", unpack(pack(record)))
    assert job.rcpts[1] == Recipient("b@d.test", RcptState.DELIVERED, 250, "ok")
    assert job.waiting() == ["a@d.test"] and job.state() == JobState.DEFERRED
    assert job.to_record() == record
    job.held = REASON
    assert job.state() == JobState.HELD and job.to_record()["held"] == REASON


@pytest.mark.asyncio
async def test_a_job_held_while_sending_and_released_is_not_a_possible_duplicate(
        tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        message = r.store(["a@dest.test"])
        item = await r.next_dispatched()
        assert item.job.msg == message.id and not item.maybe_sent
        assert r.sending(item.job_id)  # marked before delivery got it
        # The campaign is paused while the item waits at the destination's pace: delivery
        # asks again just before sending, and the job is held.
        r.holds.holding.add("spring")
        assert await r.scheduler.hold(item, REASON) == HoldResult.HELD
        job = r.job(item.job_id)
        assert job is not None and job.state() == JobState.HELD
        assert not r.sending(item.job_id)  # the attempt that never happened is over
        # An operator resumes: the job is due again and goes out unflagged.
        r.holds.holding.clear()
        released = await r.committer.submit(
            lambda txn: jobs.release_reason(r.spool, txn, REASON, int(time.time() * 1000)))
        assert released == 1
        again = await r.next_dispatched()
        assert again.job_id == item.job_id and not again.maybe_sent


@pytest.mark.asyncio
async def test_a_job_cut_off_mid_send_is_flagged_when_it_goes_out_again(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        r.store(["a@dest.test"])
        item = await r.next_dispatched()
        assert r.sending(item.job_id)
        # A crash: the worker's memory is gone, the marker stays on disk.
        r.scheduler.in_flight.discard(item.job_id)
        again = await r.next_dispatched()
        assert again.job_id == item.job_id and again.maybe_sent


@pytest.mark.asyncio
async def test_the_hold_check_runs_before_the_sending_marker(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        r.holds.holding.add("spring")
        held = r.store(["a@dest.test"])
        sent = r.store(["b@dest.test"], campaign="summer")
        item = await r.next_dispatched()
        assert item.job.msg == sent.id
        async with asyncio.timeout(10):
            while HoldResult.HELD not in r.holds.results:
                await asyncio.sleep(0.01)
        job = r.job(f"{held.id}.0".encode())
        assert job is not None and job.held == REASON
        assert not r.sending(job.id)


@pytest.mark.asyncio
async def test_an_attempt_moves_deferred_recipients_and_removes_a_finished_job(
        tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        message = r.store(["a@dest.test", "b@dest.test"])
        item = await r.next_dispatched()
        await r.scheduler.complete(item, [RcptResult("a@dest.test", 250, "ok"),
                                          RcptResult("b@dest.test", 451, "4.3.0 later")])
        job = r.job(item.job_id)
        assert job is not None and job.waiting() == ["b@dest.test"]
        assert job.state() == JobState.DEFERRED and job.error == "4.3.0 later"
        assert not r.sending(item.job_id)
        result = await r.committer.submit(lambda txn: jobs.remove(r.spool, txn, [job]))
        assert result[0].recipients == ["b@dest.test"]
        with r.spool.read() as txn:
            assert r.spool.get_message(txn, message.id) is None
