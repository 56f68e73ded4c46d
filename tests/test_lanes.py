"""Priority lanes: transactional mail ahead of bulk, bulk keeping its share. Units, then
an engine on loopback with a bulk backlog behind a slow sink."""

from __future__ import annotations

import json
import smtplib
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

import pytest

from bench.engine_proc import EngineProcess
from bench.net import free_port, wait_for_port
from bench.rig.sinks import SinkFaults
from mta.inject.auth import api_key_hash, new_api_key
from mta.queue.lanes import BULK, TRANSACTIONAL, LaneQueue, choose_lane
from mta.queue.spool import NewMessage, Spool
from mta.wire import without_fields
from tests.helpers.engine import engine_config, wait_until

KEY = new_api_key()


@dataclass
class _Item:
    name: str
    message: dict[str, Any]


def _item(name: str, lane: str = "") -> _Item:
    return _Item(name, {"lane": lane})


def test_choose_lane() -> None:
    assert choose_lane("", BULK, []) == BULK
    assert choose_lane("Transactional", BULK, [TRANSACTIONAL]) == TRANSACTIONAL
    assert choose_lane("transactional", BULK, []) == BULK  # not allowed: the default
    assert choose_lane("bulk", TRANSACTIONAL, []) == TRANSACTIONAL
    assert choose_lane("urgent", BULK, [TRANSACTIONAL]) is None


def test_lane_queue_puts_transactional_first_and_keeps_bulk_share() -> None:
    queue = LaneQueue(bulk_share=0.25)
    for n in range(8):
        queue.append(_item(f"b{n}"))
    for n in range(8):
        queue.append(_item(f"t{n}", TRANSACTIONAL))
    assert len(queue) == 16 and queue
    order = [queue.popleft().name for _ in range(16)]
    assert order[:6] == ["b0", "t0", "t1", "t2", "b1", "t3"]  # bulk: 1 pop in 4, first
    for n in range(1, 17):  # bulk's share holds over every prefix while both wait
        assert sum(name.startswith("b") for name in order[:n]) >= 0.25 * n
    assert [n for n in order if n.startswith("t")] == [f"t{n}" for n in range(8)]
    assert not queue
    with pytest.raises(IndexError):
        queue.popleft()
    queue.append(_item("b"))
    queue.appendleft(_item("t", TRANSACTIONAL))
    assert [i.name for i in queue] == ["t", "b"]
    queue.clear()
    assert len(queue) == 0


def test_transactional_jobs_have_their_own_due_index(tmp_path) -> None:
    spool = Spool(tmp_path / "spool", map_size=64 * 1024**2)
    fast = NewMessage("s@shop.test", ["a@x.test"], b"m", lane=TRANSACTIONAL)
    slow = NewMessage("s@shop.test", ["b@x.test"], b"m")
    spool.apply([spool.store_op(slow), spool.store_op(fast)])
    now_ms = int(time.time() * 1000) + 1000
    with spool.read() as txn:
        assert [j for _, _, j in spool.due(txn, now_ms, transactional=True)] == [
            f"{fast.id}.0".encode()]
        assert [j for _, _, j in spool.due(txn, now_ms)] == [f"{slow.id}.0".encode()]
        [job] = spool.jobs(txn, prefix=fast.id.encode())
        assert job.lane == TRANSACTIONAL
        assert spool.get_message(txn, fast.id)["lane"] == TRANSACTIONAL
    spool.close()
    assert without_fields(b"X-MTA-Lane: transactional\r\nA: b\r\n\r\nx", "X-MTA-Lane") == (
        b"A: b\r\n\r\nx")


BULK_COUNT = 50_000
BATCH = 10_000  # recipients of one injection request ([inject] max_recipients)
SINK_DELAY = 0.01  # seconds before each 250 at the one connection: 100 messages/s at most
BULK_SHARE = 0.2


def _inject(url: str, first: int, count: int) -> None:
    body = {"envelope_sender": "s@shop.test",
            "recipients": [{"email": f"b{n}@lane.test"} for n in range(first, first + count)],
            "content": "From: s@shop.test\nSubject: bulk\n\nx\n"}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        assert reply.status == 200


def test_transactional_overtakes_a_50k_bulk_backlog(tmp_path, dns_server,
                                                    asyncio_sink_factory) -> None:
    """50,000 bulk messages queued behind a sink taking 100 messages/s, then 10
    transactional ones: all 10 delivered within 2 s of their acceptance (p99 of 10: the
    slowest), and bulk keeps at least its share of the sink's deliveries meanwhile."""
    sink = asyncio_sink_factory(host="127.0.0.2", record=True,
                                faults=SinkFaults(dot_delay=SINK_DELAY))
    dns_server.add_mx("lane.test", [(10, "mx.lane.test")])
    dns_server.add_a("mx.lane.test", "127.0.0.2")
    inject_port = free_port()
    config = engine_config(
        tmp_path, dns={"nameservers": [dns_server.address], "timeout": 5.0},
        delivery={"enabled": True, "port": sink.port, "allow_loopback_mx": True,
                  "max_connections_per_destination": 1, "bulk_min_share": BULK_SHARE},
        smtp={"trusted_account": "shop"}, inject={"listen": f"127.0.0.1:{inject_port}"},
        tracking={"opens": False, "clicks": False},
        accounts=[{"name": "shop", "lanes": ["transactional"],
                   "api_key_hashes": [api_key_hash(KEY)]}])
    accepted: dict[str, float] = {}
    with EngineProcess(tmp_path, config) as engine:
        wait_for_port("127.0.0.1", inject_port, 10)
        url = f"http://127.0.0.1:{inject_port}/api/inject/v1"
        started = time.monotonic()
        for first in range(0, BULK_COUNT, BATCH):
            _inject(url, first, BATCH)
        queued_in = time.monotonic() - started
        assert wait_until(lambda: sink.messages >= 100, timeout=60)
        with smtplib.SMTP(engine.host, engine.port) as client:
            for n in range(10):
                before = time.time()
                client.sendmail("s@shop.test", [f"t{n}@lane.test"],
                                f"From: s@shop.test\r\nX-MTA-Lane: transactional\r\n"
                                f"Subject: t{n}\r\n\r\nx\r\n")
                accepted[f"t{n}@lane.test"] = (before + time.time()) / 2
        assert wait_until(lambda: sum(m.rcpt_tos[0].startswith("t") for m in sink.snapshot())
                          == 10, timeout=60)
        backlog = BULK_COUNT + 10 - sink.messages
    received = list(sink.received)
    fast = {m.rcpt_tos[0]: m for m in received if m.rcpt_tos[0].startswith("t")}
    waits = sorted(fast[r].received_at - accepted[r] for r in accepted)
    start, end = min(accepted.values()), max(m.received_at for m in fast.values())
    during = [m for m in received if start <= m.received_at <= end]
    bulk = sum(m.rcpt_tos[0].startswith("b") for m in during)
    print(f"lanes: {BULK_COUNT} bulk queued in {queued_in:.1f} s; transactional waits "
          f"{[round(w, 3) for w in waits]}; window {end - start:.2f} s: {bulk} bulk of "
          f"{len(during)} deliveries; backlog left {backlog}")
    assert backlog > BULK_COUNT // 2, "the bulk backlog was gone before the test's mail came"
    assert waits[-1] < 2.0, waits  # p99 of 10: the slowest
    assert all(b"x-mta-lane" not in m.data.lower() for m in fast.values())
    assert bulk >= BULK_SHARE * len(during), (bulk, len(during))  # bulk kept its share
