"""Cluster-wide throttle budgets (mta.cluster.throttle) against a real redis-server.

Unit level: workers of different "nodes" (each its own RedisLink and Throttle) compete
for one provider's connection leases and message pace. End to end: two engine nodes
(own ports and spools, one Redis, one DNS) deliver to a throttling MX that allows K
connections in total; and Redis is stopped mid-run and started again.
"""

from __future__ import annotations

import asyncio
import smtplib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.engine_proc import read_events
from bench.rig.throttle_mx import BackgroundThrottleMx
from mta.cluster import RedisLink
from mta.cluster.throttle import FULL_MEMORY, ClusterThrottle, batch_size
from mta.config import ClusterConfig
from mta.throttle import WAIT_FOR_CLOSE, Throttle, parse_shaping
from mta.throttle.throttle import Budget, Destination
from tests.helpers.engine import wait_until
from tests.helpers.http import start_http_engine
from tests.test_metrics_engine import scrape, value

SHAPING = {
    "default": {"max_connections": 10, "message_rate": "unlimited",
                "connection_rate": "unlimited"},
    "provider": {"big": {"mx_suffixes": [".big.test"], "max_connections": 3,
                         "message_rate": "20/s", "message_burst": 2,
                         "connection_rate": "unlimited"}},
}


def cluster_cfg(url: str, **extra: Any) -> ClusterConfig:
    values: dict[str, Any] = {"redis": url, "timeout": 0.3, "retry_interval": 0.2,
                              "node_ttl": 1.5, **extra}
    return ClusterConfig(**values)


async def gate(cfg: ClusterConfig, member: str, local_workers: int = 1,
               shaping: dict[str, Any] | None = None) -> tuple[ClusterThrottle, Destination]:
    link = RedisLink(cfg, member)
    await link.start()
    throttle = Throttle(parse_shaping(shaping or SHAPING))
    dest = throttle.destination("x.test", ["mx.big.test"])
    return ClusterThrottle(link, throttle, local_workers), dest


async def close(*gates: ClusterThrottle) -> None:
    for g in gates:
        await g.close()
        await g.link.close()


LIVE_LEASES = ("local t = redis.call('TIME') "
               "return redis.call('ZCOUNT', KEYS[1], '(' .. (t[1] + t[2] / 1e6), '+inf')")


K = 3


def leases(redis_server: Any) -> int:
    """Leases of the provider not expired (by Redis's clock)."""
    return int(redis_server.cli("EVAL", LIVE_LEASES, "1", "mta:throttle:leases:provider:big"))


def test_two_nodes_competing_never_hold_more_than_k_leases(redis_server) -> None:
    cfg = cluster_cfg(redis_server.url)

    async def scenario() -> None:
        (a, dest), (b, _) = await gate(cfg, "n1/0"), await gate(cfg, "n2/0")
        # Both ask at once, many times: exactly K grants, whoever wins.
        answers = await asyncio.gather(*(g.connect(dest) for _ in range(6) for g in (a, b)))
        assert answers.count(0.0) == 3 and answers.count(WAIT_FOR_CLOSE) == 9
        assert a.open_connections() + b.open_connections() == 3 == leases(redis_server)
        assert await a.connect(dest) == WAIT_FOR_CLOSE  # told without asking Redis again
        most, fewest = sorted((a, b), key=ClusterThrottle.open_connections, reverse=True)
        await most.release(dest)
        assert leases(redis_server) == 2
        await asyncio.sleep(FULL_MEMORY)
        assert await fewest.connect(dest) == 0.0
        assert await most.connect(dest) == WAIT_FOR_CLOSE
        await close(a, b)

    asyncio.run(scenario())


def test_a_waiting_node_gets_its_fair_share(redis_server) -> None:
    """One node holds all K leases; another is refused: the first is told to close what
    is over its fair share, and may not take back the room while the other waits."""
    cfg = cluster_cfg(redis_server.url)

    async def scenario() -> None:
        (a, dest), (b, _) = await gate(cfg, "n1/0"), await gate(cfg, "n2/0")
        for _ in range(K):
            assert await a.connect(dest) == 0.0
        assert not a.shed(dest)
        assert await b.connect(dest) == WAIT_FOR_CLOSE  # b waits now
        await a._write_leases()  # the renewal learns of b
        assert a.shed(dest)  # 3 > ceil(3 / 2): close one
        assert not a.shed(dest)  # only one
        await a.release(dest)
        await a._write_leases()
        assert not a.shed(dest)
        assert await a.connect(dest) == WAIT_FOR_CLOSE  # b's turn, though there is room
        await asyncio.sleep(FULL_MEMORY)
        assert await b.connect(dest) == 0.0
        await close(a, b)

    asyncio.run(scenario())


def test_leases_expire_unless_renewed(redis_server) -> None:
    """A node that stops renewing (dead, or cut off) frees its leases after node_ttl;
    a live one renews them."""
    cfg = cluster_cfg(redis_server.url)

    async def scenario() -> None:
        (dead, dest), (live, _) = await gate(cfg, "n1/0"), await gate(cfg, "n2/0")
        live.start()  # renews every node_ttl / 3; `dead` never does
        assert await dead.connect(dest) == 0.0
        assert await live.connect(dest) == 0.0
        assert await live.connect(dest) == 0.0
        assert await live.connect(dest) == WAIT_FOR_CLOSE
        await asyncio.sleep(cfg.node_ttl + 0.3)
        assert leases(redis_server) == 2  # the dead node's lease is gone, the others held
        assert await live.connect(dest) == 0.0
        await close(dead, live)

    asyncio.run(scenario())


def test_message_pace_is_shared_and_batched(redis_server) -> None:
    """20/s, burst 2, across two nodes: about 20 messages a second in total."""
    cfg = cluster_cfg(redis_server.url)

    async def sender(g: ClusterThrottle, dest: Destination, until: float) -> int:
        sent = 0
        while time.monotonic() < until:
            wait = await g.send(dest)
            if wait:
                await asyncio.sleep(wait)
            else:
                sent += 1
        return sent

    async def scenario() -> None:
        (a, dest), (b, _) = await gate(cfg, "n1/0"), await gate(cfg, "n2/0")
        until = time.monotonic() + 2.0
        sent = await asyncio.gather(sender(a, dest, until), sender(b, dest, until))
        assert 30 <= sum(sent) <= 2 * 20 + 2 + 2, sent  # 2 s at 20/s plus the burst
        assert min(sent) >= 12, sent  # both got a fair share: they are served in turn
        await close(a, b)

    asyncio.run(scenario())
    budget = Budget("provider:x", 3, 1000.0, 101, None)
    assert batch_size([budget]) == 50
    assert batch_size([budget, Budget("domain:y", 3, 20.0, 2, None)]) == 1


def test_while_redis_is_down_local_shares_then_catch_up(redis_server) -> None:
    """Down: each worker keeps max_connections // (workers in the cluster) after a short
    hold-off and says so; up: the open connections' leases are written again first."""
    cfg = cluster_cfg(redis_server.url)

    async def scenario() -> None:
        (a, dest), (b, _) = await gate(cfg, "n1/0"), await gate(cfg, "n2/0")
        await a.link._check()
        assert a.link.live_workers == 2
        assert await a.connect(dest) == 0.0
        assert await a.connect(dest) == 0.0
        redis_server.stop()
        assert 0 < await a.connect(dest) < WAIT_FOR_CLOSE  # the hold-off
        assert not a.link.up
        assert a.shed(dest)  # 2 open, local share 3 // 2 = 1: close one
        assert not a.shed(dest)  # only one
        await a.release(dest)
        assert not a.shed(dest)
        await asyncio.sleep(a._holdoff())
        assert await a.connect(dest) == WAIT_FOR_CLOSE  # 1 open = its share
        assert a.open_connections() == 1
        redis_server.start()
        for _ in range(60):
            if a.link.up:
                break
            await asyncio.sleep(0.1)
        assert a.link.up
        await a.catch_up()
        # The AOF kept both old leases until they expire; the open one is renewed.
        await asyncio.sleep(cfg.node_ttl)
        await a.catch_up()
        assert leases(redis_server) == 1
        assert await a.connect(dest) == 0.0
        await close(a, b)

    asyncio.run(scenario())


def test_single_worker_cannot_exceed_single_node_share_while_down(redis_server) -> None:
    """Redis unreachable from the start: the local split is never looser than a node's."""
    cfg = cluster_cfg("redis://127.0.0.1:9/0")

    async def scenario() -> None:
        g, dest = await gate(cfg, "n1/0", local_workers=2)
        await asyncio.sleep(g._holdoff())
        assert await g.connect(dest) == 0.0
        assert await g.connect(dest) == WAIT_FOR_CLOSE  # 3 // 2 workers on this node
        await close(g)

    asyncio.run(scenario())


# --- two engine nodes against a throttling MX ---------------------------------------------

NODE_SHAPING = """
[default]
max_connections = 10
message_rate = "unlimited"
connection_rate = "unlimited"

[provider.big]
mx_suffixes = [".big.test"]
max_connections = {k}
max_messages_per_connection = {per_connection}
message_rate = "{rate}"
connection_rate = "unlimited"
"""
DOMAINS = [f"d{i}.test" for i in range(4)]


def route_to(dns: Any, port_host: str = "127.0.0.2") -> None:
    for domain in DOMAINS:
        dns.add_mx(domain, [(10, "mx.big.test")])
    dns.add_a("mx.big.test", port_host)


def start_node(tmp: Path, redis_url: str, dns: Any, mx_port: int, rate: str = "unlimited",
               per_connection: int = 5) -> Any:
    tmp.mkdir(parents=True, exist_ok=True)
    shaping = tmp / "shaping.toml"
    shaping.write_text(NODE_SHAPING.format(k=K, per_connection=per_connection, rate=rate))
    return start_http_engine(
        tmp, workers=1, dns={"nameservers": [dns.address], "timeout": 5.0},
        delivery={"enabled": True, "port": mx_port, "allow_loopback_mx": True,
                  "retry_initial": 300.0, "connect_timeout": 3.0, "command_timeout": 5.0,
                  "connection_idle_timeout": 1.0},
        throttle={"shaping_file": str(shaping)}, bounce={"verp_secret": "cluster-verp"},
        policy={"unsubscribe_secret": "cluster-unsub"},
        cluster={"redis": redis_url, "node": tmp.name, "timeout": 0.3,
                 "retry_interval": 0.3, "node_ttl": 2.0})


def submit(node: Any, count: int, tag: str) -> None:
    with smtplib.SMTP(node.host, node.port, timeout=30) as client:
        for i in range(count):
            rcpt = f"{tag}{i}@{DOMAINS[i % len(DOMAINS)]}"
            body = f"From: <a@shop.test>\r\nTo: <{rcpt}>\r\nSubject: {tag}{i}\r\n\r\nhi\r\n"
            client.sendmail("a@shop.test", [rcpt], body.encode())


def events(node: Any, kind: str) -> list[dict[str, Any]]:
    return read_events(node.workdir / "events.jsonl", kind)


def delivered(node: Any) -> int:
    return len(events(node, "Delivery"))


def redis_up_metric(node: Any) -> tuple[float, float]:
    metrics = scrape(node.url)
    return (value(metrics, "mta_cluster_redis_up", worker="0"),
            value(metrics, "mta_cluster_redis_outages_total"))


@contextmanager
def two_nodes(tmp: Path, redis_url: str, dns: Any, mx_port: int, **shaping: Any
              ) -> Iterator[list[Any]]:
    nodes = [start_node(tmp / name, redis_url, dns, mx_port, **shaping) for name in ("n1", "n2")]
    try:
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def submit_to_both(nodes: list[Any], count: int) -> None:
    with ThreadPoolExecutor(len(nodes)) as pool:
        list(pool.map(lambda n: submit(n[1], count, f"u{n[0]}-"), enumerate(nodes)))


def all_delivered(nodes: list[Any], count: int) -> bool:
    return wait_until(lambda: all(delivered(n) == count for n in nodes), timeout=30)


def test_two_nodes_together_never_exceed_k_connections(tmp_path, dns_server, redis_server
                                                       ) -> None:
    """Each node alone would open K connections (one worker keeps the whole budget):
    together, through Redis, they never ask the MX for more than K."""
    count = 60
    route_to(dns_server)
    with BackgroundThrottleMx(host="127.0.0.2", max_connections=K, rate=10_000) as mx:
        with two_nodes(tmp_path, redis_server.url, dns_server, mx.port) as nodes:
            submit_to_both(nodes, count)
            done = all_delivered(nodes, count)
        stats = mx.stats
    assert done, [delivered(n) for n in nodes]
    assert stats.refused == 0, stats  # never a connection over K
    assert stats.max_concurrent <= K
    assert stats.accepted == 2 * count
    assert not events(nodes[0], "TransientFailure") and not events(nodes[1], "TransientFailure")


def test_redis_outage_mid_run_local_limits_then_catch_up(tmp_path, dns_server, redis_server
                                                         ) -> None:
    """Redis stops mid-run: both nodes go on at their local share (and say so in metrics,
    the event log and their logs); it starts again: they catch up; nothing is lost."""
    count, rate = 60, 15.0  # 120 messages at 15/s: about 8 s, the outage in the middle
    route_to(dns_server)
    with BackgroundThrottleMx(host="127.0.0.2", max_connections=K, rate=10_000) as mx:
        with two_nodes(tmp_path, redis_server.url, dns_server, mx.port,
                       rate=f"{rate:g}/s", per_connection=20) as nodes:
            assert redis_up_metric(nodes[0]) == (1.0, 0.0)
            submit_to_both(nodes, count)
            assert wait_until(lambda: sum(map(delivered, nodes)) >= 25, timeout=15)
            redis_server.stop()
            before = sum(map(delivered, nodes))
            assert wait_until(lambda: redis_up_metric(nodes[0])[0] == 0.0, timeout=10)
            time.sleep(3.0)
            during = sum(map(delivered, nodes)) - before
            redis_server.start()
            assert wait_until(lambda: redis_up_metric(nodes[0])[0] == 1.0, timeout=10)
            assert redis_up_metric(nodes[0])[1] >= 1.0
            done = all_delivered(nodes, count)
        stats = mx.stats
    assert done, [delivered(n) for n in nodes]
    assert during > 0  # delivery went on while Redis was down
    assert stats.accepted == 2 * count and stats.max_concurrent <= K
    for node in nodes:
        changes = [e["type"] for e in events(node, "ClusterDown") + events(node, "ClusterUp")]
        assert changes.count("ClusterDown") == changes.count("ClusterUp") >= 1
        log = node.log_text()
        assert "running on local limits" in log and "reachable again" in log


def test_bench_goodput_counts_idle_seconds() -> None:
    """bench/cluster_bench.py: whole seconds after the first delivery, until the end."""
    from bench.cluster_bench import steady_rate

    assert steady_rate([0, 50, 100, 100, 30], 4.3) == 100.0  # the partial last second out
    assert steady_rate([0, 50, 100, 0, 0], 10.0) == 12.5  # locked out: idle seconds count
    assert steady_rate([], 3.0) == 0.0
