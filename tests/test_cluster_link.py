"""The Redis link against a real redis-server: registration, down and up again."""

from __future__ import annotations

import asyncio

import pytest

from mta.cluster import DOWN, RedisLink, check_cluster
from mta.config import ClusterConfig, Config, ConfigError
from mta.text import without_password


def test_registers_goes_down_and_comes_back(redis_server) -> None:
    cfg = ClusterConfig(redis=redis_server.url, timeout=0.3, retry_interval=0.1, node_ttl=2.0)

    async def scenario() -> None:
        a, b = RedisLink(cfg, "n1/0"), RedisLink(cfg, "n2/0")
        caught_up: list[str] = []

        async def catch_up() -> None:
            caught_up.append("a")

        a.on_up.append(catch_up)
        await a.start()
        await b.start()
        await a._check()
        assert a.up and a.live_workers == 2
        assert await a.call(lambda: a.redis.set(a.key("x"), "1")) is True
        redis_server.stop()
        assert await a.call(lambda: a.redis.get(a.key("x"))) is DOWN
        assert not a.up and a.outages == 1
        assert await a.call(lambda: a.redis.get(a.key("x"))) is DOWN  # at once while down
        redis_server.start()
        for _ in range(50):
            if a.up:
                break
            await asyncio.sleep(0.1)
        assert a.up and caught_up == ["a", "a"]  # at start, and after the outage
        assert await a.call(lambda: a.redis.get(a.key("x"))) == b"1"  # the AOF kept it
        await b.close()
        await a._check()
        assert a.live_workers == 1
        await a.close()

    asyncio.run(scenario())


def test_a_restart_no_call_noticed_still_runs_the_catch_up(redis_server) -> None:
    """Redis stopped and started while this worker made no call (the connection pool
    replaces the closed connections by itself): the probe sees the server's new run_id
    and the link catches up."""
    cfg = ClusterConfig(redis=redis_server.url, timeout=0.3, retry_interval=0.1, node_ttl=2.0)

    async def scenario() -> None:
        link = RedisLink(cfg, "n1/0")
        events: list[str] = []

        async def up() -> None:
            events.append("up")

        link.on_up.append(up)
        link.on_down.append(lambda: events.append("down"))
        await link._check()  # no keep-alive task: nothing runs during the outage
        first = link.run_id
        redis_server.stop()
        await asyncio.sleep(0.1)  # the pool sees its connections closed; no call is made
        redis_server.start()
        # The worker's own traffic: the pool reconnects by itself, nothing fails.
        assert await link.call(lambda: link.redis.get(link.key("x"))) is None
        assert link.up and link.outages == 0
        await link._check()
        assert link.up and link.outages == 1 and events == ["up", "down", "up"]
        assert link.run_id and link.run_id != first
        await link._check()  # the same server again: nothing more
        assert link.outages == 1 and events == ["up", "down", "up"]
        await link.close()

    asyncio.run(scenario())


def test_a_cluster_needs_the_same_secrets_on_every_node() -> None:
    cfg = Config(cluster=ClusterConfig(redis="redis://127.0.0.1:6379/0"))
    check_cluster(Config())  # a single node keeps its per-spool random key
    with pytest.raises(ConfigError, match=r"^\[policy\] unsubscribe_secret: set it"):
        check_cluster(cfg)
    cfg.policy.unsubscribe_secret = "shared"
    with pytest.raises(ConfigError, match=r"^\[bounce\] verp_secret: set it"):
        check_cluster(cfg)
    cfg.bounce.verp_secret = "also-shared"
    check_cluster(cfg)


def test_logs_never_show_the_redis_password() -> None:
    assert without_password("redis://:s3cret@10.0.0.1:6379/0") == "redis://:***@10.0.0.1:6379/0"
    assert without_password("rediss://ops:s3cret@r.test/1") == "rediss://ops:***@r.test/1"
    assert without_password("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
