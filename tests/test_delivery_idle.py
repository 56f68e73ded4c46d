"""A pool's connection workers (mta.delivery.deliverer): an item wakes one idle worker,
not all (IdleWorkers); a timed-out or cancelled sleeper leaves no trace; a burst of
items opens connections a few at a time (slow start); a route with TTL 0 serves the
connections it opened without a lookup per message."""

from __future__ import annotations

import asyncio
from typing import Any

from mta.delivery.deliverer import OPENING_AT_ONCE, IdleWorkers


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


def test_a_burst_of_items_opens_connections_a_few_at_a_time() -> None:
    """Slow start: twenty items for one destination whose server has not greeted yet
    start OPENING_AT_ONCE connections, not twenty; once one of them is up and items
    still wait, the pool opens one more."""
    from mta.config import SHIPPED_SHAPING, Config
    from mta.delivery.deliverer import Deliverer
    from mta.delivery.mx import Host, Route
    from mta.queue.jobs import new_job
    from mta.queue.scheduler import Item
    from mta.throttle.shaping import load_shaping
    from mta.throttle.shared import LocalBudget
    from mta.throttle.throttle import Throttle
    from tests.helpers.delivery import RecordingScheduler

    async def scenario() -> tuple[tuple[int, int], tuple[int, int]]:
        accepted: list[asyncio.StreamWriter] = []
        greetings = asyncio.Semaphore(0)  # one greeting per release

        async def held_greeting(reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
            accepted.append(writer)
            await greetings.acquire()
            writer.write(b"220 mx.slow.test ready\r\n")
            await reader.readline()  # EHLO
            writer.write(b"250 mx.slow.test\r\n")
            await reader.readline()  # MAIL FROM: never answered, the connection stays busy
            await asyncio.Event().wait()

        server = await asyncio.start_server(held_greeting, "127.0.0.7", 0)
        cfg = Config()
        cfg.delivery.port = server.sockets[0].getsockname()[1]

        class Resolver:
            async def route(self, domain: str) -> Route:
                return Route(domain, (Host("mx.slow.test", ("127.0.0.7",)),))

        deliverer = Deliverer(cfg, Resolver(), Throttle(load_shaping(SHIPPED_SHAPING)),
                              LocalBudget(), RecordingScheduler(), [], set(),
                              None)  # type: ignore[arg-type]
        for i in range(20):
            job = new_job(b"S%d.0" % i, f"S{i}", "slow.test", "", "", [f"u{i}@slow.test"], 0)
            deliverer.dispatch(Item(job, {"id": f"S{i}", "from": "a@b.test", "received": 0.0,
                                          "data": b"Subject: x\r\n\r\nbody\r\n"}, 0.0))

        def queued() -> int:
            return sum(len(pool.queue) for pool in deliverer.pools.values())

        for _ in range(2000):  # loop turns and short sleeps, bounded: until all are routed
            if len(accepted) == OPENING_AT_ONCE and queued() == 20 - OPENING_AT_ONCE:
                break
            await asyncio.sleep(0.005)
        (pool,) = deliverer.pools.values()
        while_held = (pool.workers, len(accepted))
        greetings.release()  # one connection comes up (and stays busy with its item)
        for _ in range(2000):
            if len(accepted) > OPENING_AT_ONCE:
                break
            await asyncio.sleep(0.005)
        after_one_up = (pool.workers, len(accepted))
        await deliverer.close()
        server.close()
        for writer in accepted:
            writer.close()
        return while_held, after_one_up

    while_held, after_one_up = asyncio.run(scenario())
    assert while_held == (OPENING_AT_ONCE, OPENING_AT_ONCE)
    assert after_one_up == (OPENING_AT_ONCE + 1, OPENING_AT_ONCE + 1)


def test_a_route_with_ttl_0_serves_its_open_connection_and_is_looked_up_once_closed(
        dns_server: Any, asyncio_sink_factory: Any) -> None:
    """Answers with TTL 0 are not kept, but while a connection their route opened is up,
    the next message for the domain goes over it without a new lookup (as Postfix finds
    a cached connection by the domain first); once it is closed, the next one is looked
    up again. A route with a TTL is the resolver's to keep: not held by the pool."""
    from mta.config import SHIPPED_SHAPING, Config, DnsConfig
    from mta.delivery.deliverer import Deliverer
    from mta.delivery.mx import MxResolver
    from mta.queue.jobs import new_job
    from mta.queue.scheduler import Item
    from mta.throttle.shaping import load_shaping
    from mta.throttle.shared import LocalBudget
    from mta.throttle.throttle import Throttle
    from tests.helpers.delivery import RecordingScheduler

    sink = asyncio_sink_factory(host="127.0.0.8")
    dns_server.add_mx("zero.test", [(10, "mx.zero.test")], ttl=0)
    dns_server.add_a("mx.zero.test", "127.0.0.8", ttl=0)

    async def scenario() -> list[int]:
        cfg = Config()
        cfg.delivery.port = sink.port
        cfg.delivery.connection_idle_timeout = 2.0
        resolver = MxResolver(DnsConfig(nameservers=[dns_server.address]),
                              allow_loopback_mx=True)
        scheduler = RecordingScheduler()
        deliverer = Deliverer(cfg, resolver, Throttle(load_shaping(SHIPPED_SHAPING)),
                              LocalBudget(), scheduler, [], set(),
                              None)  # type: ignore[arg-type]
        mx_queries: list[int] = []

        async def deliver(i: int) -> None:
            job = new_job(b"Z%d.0" % i, f"Z{i}", "zero.test", "", "", [f"u{i}@zero.test"], 0)
            deliverer.dispatch(Item(job, {"id": f"Z{i}", "from": "a@b.test", "received": 0.0,
                                          "data": b"Subject: x\r\n\r\nbody\r\n"}, 0.0))
            for _ in range(2000):  # bounded: until its outcome is in
                if f"Z{i}.0" in scheduler.results:
                    break
                await asyncio.sleep(0.005)
            assert [r.code for r in scheduler.results[f"Z{i}.0"]] == [250]
            mx_queries.append(dns_server.count("zero.test", "MX"))

        await deliver(1)
        await deliver(2)  # the connection of the first is up and idle
        (pool,) = deliverer.pools.values()
        for _ in range(1000):  # bounded: until the idle connection is closed
            if pool.workers == 0:
                break
            await asyncio.sleep(0.01)
        await deliver(3)
        await deliverer.close()
        return mx_queries

    assert asyncio.run(scenario()) == [1, 1, 2]
