"""A pool's idle connection workers (mta.delivery.deliverer.IdleWorkers): an item wakes
one of them, not all; a timed-out or cancelled sleeper leaves no trace."""

from __future__ import annotations

import asyncio

from mta.delivery.deliverer import IdleWorkers


def test_an_item_wakes_one_idle_worker_and_the_others_sleep_on() -> None:
    async def scenario() -> tuple[int, int, int, bool]:
        idle = IdleWorkers()
        woken: list[int] = []

        async def worker(n: int) -> None:
            await idle.sleep(30)
            woken.append(n)

        tasks = [asyncio.create_task(worker(n)) for n in range(5)]
        await asyncio.sleep(0)
        sleeping = len(idle)
        assert idle.wake_one()
        about_to_run = idle.any() and len(idle) == 4 and idle.waking == 1
        for _ in range(10):  # loop turns, not time: the woken one runs in the first
            await asyncio.sleep(0)
        first = len(woken)
        idle.wake_all()
        await asyncio.gather(*tasks)
        return sleeping, first, idle.waking, about_to_run

    sleeping, first, waking, about_to_run = asyncio.run(scenario())
    assert sleeping == 5
    assert about_to_run  # the woken one counts until it runs: no new connection for it
    assert first == 1
    assert waking == 0


def test_a_sleeper_that_timed_out_or_was_cancelled_is_gone() -> None:
    async def scenario() -> tuple[int, int, bool]:
        idle = IdleWorkers()
        await idle.sleep(0.01)  # timed out
        after_timeout = len(idle)
        task = asyncio.create_task(idle.sleep(30))
        await asyncio.sleep(0)
        task.cancel()
        assert not idle.wake_one()  # the cancelled sleeper is skipped, nothing raised
        await asyncio.gather(task, return_exceptions=True)
        return after_timeout, len(idle), idle.any()

    after_timeout, left, any_idle = asyncio.run(scenario())
    assert after_timeout == 0
    assert left == 0 and not any_idle
