"""Warm-up end to end: real engines deliver from two loopback source addresses to a
recording sink (which sees the peer address) through a loopback DNS.

The warming source 127.0.0.2 starts today with a day-0 cap of 50 at provider "big"
(every *.big.test domain); 127.0.0.3 is established. The day rollover itself is tested
with a fake clock at the unit level (tests/test_warmup.py); here the time zone is chosen
so that no midnight falls within the test.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import smtplib
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from bench.engine_proc import read_events
from bench.rig.sinks import SinkFaults
from mta.egress.warmup import Ramp
from mta.egress.warmup_store import LmdbRampStore
from mta.queue.commit import GroupCommitter
from mta.queue.spool import Spool
from tests.helpers.engine import start_engine, wait_until

WARM, ESTABLISHED, SINK = "127.0.0.2", "127.0.0.3", "127.0.0.5"
DOMAINS = [f"d{i}.big.test" for i in range(4)]
SHAPING = """
[default]
max_connections = 10
message_rate = "unlimited"
connection_rate = "unlimited"

[provider.big]
mx_suffixes = [".big.test"]
max_connections = 4
message_rate = "unlimited"
connection_rate = "unlimited"
"""


def noon_zone() -> str:
    """A fixed-offset zone where it is about noon now: no midnight during the test."""
    offset = 12 - dt.datetime.now(dt.UTC).hour  # -11 .. 12 hours east of UTC
    return "UTC" if offset == 0 else f"Etc/GMT{-offset:+d}"  # Etc/GMT-5 is UTC+5


def today_in(zone: str) -> str:
    from zoneinfo import ZoneInfo

    return dt.datetime.now(ZoneInfo(zone)).date().isoformat()


def egress(established: bool) -> dict[str, Any]:
    zone = noon_zone()
    sources = [{"name": "warm", "address": WARM, "ehlo_name": "warm.test",
                "warmup_start": today_in(zone)}]
    if established:
        sources.append({"name": "est", "address": ESTABLISHED, "ehlo_name": "est.test"})
    return {"sources": sources,
            "pools": [{"name": "p", "sources": [{"source": s["name"]} for s in sources]}],
            "default_pool": "p",
            "warmup": {"schedule": [50, 100, 0], "timezone": zone, "min_sample": 10}}


def start(tmp: Path, dns: Any, mx_port: int, established: bool = True,
          **sections: Any) -> Any:
    tmp.mkdir(parents=True, exist_ok=True)
    shaping = tmp / "shaping.toml"
    shaping.write_text(SHAPING)
    return start_engine(
        tmp, workers=2, dns={"nameservers": [dns.address], "timeout": 5.0},
        delivery={"enabled": True, "port": mx_port, "allow_loopback_mx": True,
                  "retry_initial": 300.0, "connect_timeout": 3.0, "command_timeout": 5.0,
                  "connection_idle_timeout": 1.0},
        throttle={"shaping_file": str(shaping)}, egress=egress(established), **sections)


def routes(dns: Any, sinks: Any, faults: SinkFaults | None = None) -> Any:
    """One recording sink on SINK, the MX of every domain of provider big."""
    sink = sinks(host=SINK, faults=faults, record=True)
    for domain in DOMAINS:
        dns.add_mx(domain, [(10, "mx.big.test")])
    dns.add_a("mx.big.test", SINK)
    return sink


def submit(engine: Any, count: int, tag: str) -> None:
    with smtplib.SMTP(engine.host, engine.port, timeout=30) as client:
        for i in range(count):
            rcpt = f"{tag}{i}@{DOMAINS[i % len(DOMAINS)]}"
            body = f"From: <a@shop.test>\r\nTo: <{rcpt}>\r\nSubject: {tag}{i}\r\n\r\nhi\r\n"
            client.sendmail("a@shop.test", [rcpt], body.encode())


def peers(sink: Any) -> Counter[str]:
    return Counter(m.peer.rpartition(":")[0] for m in sink.received if m.accepted)


def events(tmp: Path, kind: str) -> list[dict[str, Any]]:
    return read_events(tmp / "events.jsonl", kind)


def test_warming_source_carries_its_cap_and_the_established_one_the_rest(
        tmp_path: Path, dns_server: Any, asyncio_sink_factory: Any) -> None:
    sink = routes(dns_server, asyncio_sink_factory)
    engine = start(tmp_path, dns_server, sink.port)
    try:
        submit(engine, 200, "u")
        assert wait_until(lambda: sum(peers(sink).values()) >= 200, timeout=90), peers(sink)
        assert peers(sink) == {WARM: 50, ESTABLISHED: 150}
        assert wait_until(lambda: len(events(tmp_path, "Delivery")) >= 200, timeout=30)
        delivered = events(tmp_path, "Delivery")
        assert Counter(e.get("source") for e in delivered) == {"warm": 50, "est": 150}
        assert {e.get("provider") for e in delivered} == {"big"}
        assert {e.get("egress_provider") for e in delivered} == {"big"}  # the caps' key
        assert not events(tmp_path, "Bounce")
    finally:
        engine.stop()


def queued_later(spool_path: Path, after: float) -> int:
    """Jobs in the spool whose next attempt is after `after` (Unix time)."""
    spool = Spool(spool_path, readonly=True)
    try:
        with spool.read() as txn:
            return sum(1 for _, raw in txn.cursor(db=spool.dbs["job"])
                       if _next_ms(raw) > after * 1000)
    finally:
        spool.close()


def _next_ms(raw: bytes) -> int:
    from mta.queue.spool import unpack

    record = unpack(raw)
    return int(record["next"])


def test_without_an_established_source_the_rest_waits_for_the_next_day(
        tmp_path: Path, dns_server: Any, asyncio_sink_factory: Any) -> None:
    sink = routes(dns_server, asyncio_sink_factory)
    engine = start(tmp_path, dns_server, sink.port, established=False)
    try:
        submit(engine, 200, "u")
        assert wait_until(lambda: sum(peers(sink).values()) >= 50, timeout=90)
        soon = time.time() + 3600  # the next midnight of the noon zone is ~12 h away
        assert wait_until(lambda: queued_later(tmp_path / "spool", soon) == 150, timeout=60)
        assert peers(sink) == {WARM: 50}
        assert not events(tmp_path, "Bounce")
    finally:
        engine.stop()


def test_two_nodes_sharing_redis_never_exceed_the_cap_together(
        tmp_path: Path, dns_server: Any, asyncio_sink_factory: Any, redis_server: Any) -> None:
    sink = routes(dns_server, asyncio_sink_factory)
    cluster = {"redis": redis_server.url, "timeout": 1.0, "retry_interval": 0.3,
               "node_ttl": 2.0}
    nodes = [start(tmp_path / name, dns_server, sink.port,
                   cluster={**cluster, "node": name},
                   bounce={"verp_secret": "cluster-verp"},
                   policy={"unsubscribe_secret": "cluster-unsub"})
             for name in ("n1", "n2")]
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda n: submit(n[1], 100, f"n{n[0]}-"), enumerate(nodes)))
        assert wait_until(lambda: sum(peers(sink).values()) >= 200, timeout=120), peers(sink)
        assert peers(sink) == {WARM: 50, ESTABLISHED: 150}
        assert wait_until(lambda: sum(len(events(tmp_path / n, "Delivery"))
                                      for n in ("n1", "n2")) >= 200, timeout=30)
        by_node = [Counter(e.get("source") for e in events(tmp_path / n, "Delivery"))
                   for n in ("n1", "n2")]
        assert by_node[0]["warm"] + by_node[1]["warm"] == 50
    finally:
        for node in nodes:
            node.stop()


def test_reputation_deferrals_are_counted_against_the_warming_source(
        tmp_path: Path, dns_server: Any, asyncio_sink_factory: Any) -> None:
    """The warming source's deferrals reach the warm-up's signals (the ramp's judgement
    at midnight is tested with a fake clock in tests/test_warmup.py)."""
    faults = SinkFaults(rcpt_rules=[("^u", "421 4.7.28 Our system has detected an unusual "
                                           "rate of unsolicited mail, slow down")])
    sink = routes(dns_server, asyncio_sink_factory, faults)
    engine = start(tmp_path, dns_server, sink.port, established=False)
    try:
        submit(engine, 20, "u")
        assert wait_until(lambda: len(events(tmp_path, "TransientFailure")) >= 20, timeout=90)
        deferred = events(tmp_path, "TransientFailure")
        assert {e.get("source") for e in deferred} == {"warm"}
        assert wait_until(lambda: deferrals_recorded(tmp_path / "spool") >= 20, timeout=30)
    finally:
        engine.stop()


def deferrals_recorded(spool_path: Path) -> int:
    """The "deferrals" health signals the warm-up store holds for source warm."""
    from mta.queue.spool import unpack

    spool = Spool(spool_path, readonly=True)
    try:
        db = spool.open_db("warmup")
        if db is None:
            return 0
        with spool.env.begin(db=db) as txn:
            return sum(unpack(raw).get("deferrals", 0) for key, raw in txn.cursor()
                       if bytes(key).startswith(b"s\0warm\0"))
    finally:
        spool.close()


def seed_yesterday(spool_path: Path, signals: dict[str, int]) -> None:
    """The warm source was at step 0 at provider big yesterday, with these signals."""
    zone = noon_zone()
    yesterday = (dt.date.fromisoformat(today_in(zone)) - dt.timedelta(days=1)).isoformat()

    async def main() -> None:
        spool = Spool(spool_path, map_size=64 * 1024**2)
        committer = GroupCommitter(spool)
        committer.start()
        store = LmdbRampStore(spool, committer.submit)
        assert await store.replace(("warm", "big"), None, Ramp(0, yesterday))
        await store.add_signals({("warm", "big", yesterday): signals})
        await committer.close()
        spool.close()

    asyncio.run(main())


@pytest.mark.parametrize(("signals", "event", "warm_today"), [
    ({"delivered": 50}, "WarmupAdvanced", 100),
    ({"delivered": 35, "deferrals": 15}, "WarmupHeld", 50),
])
def test_yesterdays_signals_decide_todays_cap(tmp_path: Path, dns_server: Any,
                                              asyncio_sink_factory: Any,
                                              signals: dict[str, int], event: str,
                                              warm_today: int) -> None:
    sink = routes(dns_server, asyncio_sink_factory)
    seed_yesterday(tmp_path / "spool", signals)
    engine = start(tmp_path, dns_server, sink.port)
    try:
        submit(engine, 200, "u")
        assert wait_until(lambda: sum(peers(sink).values()) >= 200, timeout=90), peers(sink)
        assert peers(sink) == {WARM: warm_today, ESTABLISHED: 200 - warm_today}
        assert wait_until(lambda: events(tmp_path, event), timeout=30)
        [told] = events(tmp_path, event)
        assert (told["source"], told["provider"], told["cap"]) == ("warm", "big", warm_today)
        if event == "WarmupHeld":
            assert "deferral rate 30.0 %" in told["reason"]
        # `mta egress status` (and /api/v1/egress) show the step, its cap and why
        assert wait_until(lambda: warmup_shown(engine).get("sent_today") == warm_today,
                          timeout=30), warmup_shown(engine)
        shown = warmup_shown(engine)
        assert (shown["cap"], shown["verdict"]) == (warm_today, event[6:].lower())
        assert shown["reason"] == told["reason"]
    finally:
        engine.stop()


def warmup_shown(engine: Any) -> dict[str, Any]:
    """The warm-up row of source warm at provider big in the egress report."""
    from mta.config import load_config
    from mta.egress.status import egress_report

    cfg = load_config(engine.config_path)
    spool = Spool(cfg.spool.path, readonly=True)
    try:
        report = egress_report(cfg, spool)
    finally:
        spool.close()
    [warm] = [r for r in report["sources"] if r["name"] == "warm"]
    return ((warm.get("warmup") or {}).get("providers") or {}).get("big", {})
