"""Priority lanes: transactional mail ahead of bulk, bulk keeping its share. Units, then
an engine on loopback with a bulk backlog behind a slow sink."""

from __future__ import annotations

import smtplib
import time
from dataclasses import dataclass
from typing import Any

import pytest

from bench.engine_proc import EngineProcess
from bench.rig.sinks import SinkFaults
from mta.queue.lanes import BULK, TRANSACTIONAL, LaneQueue, choose_lane
from mta.queue.spool import NewMessage, Spool
from mta.smtp.intake import without_field
from tests.helpers.engine import engine_config, wait_until


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
    assert order[:5] == ["t0", "t1", "t2", "b0", "t3"]  # every 4th pop is bulk's
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
    assert without_field(b"X-MTA-Lane: transactional\r\nA: b\r\n\r\nx", "X-MTA-Lane") == (
        b"A: b\r\n\r\nx")


def test_transactional_overtakes_a_bulk_backlog(tmp_path, dns_server,
                                                asyncio_sink_factory) -> None:
    sink = asyncio_sink_factory(host="127.0.0.2", record=True,
                                faults=SinkFaults(dot_delay=0.01))
    dns_server.add_mx("lane.test", [(10, "mx.lane.test")])
    dns_server.add_a("mx.lane.test", "127.0.0.2")
    config = engine_config(
        tmp_path, dns={"nameservers": [dns_server.address], "timeout": 5.0},
        delivery={"enabled": True, "port": sink.port, "allow_loopback_mx": True,
                  "max_connections_per_destination": 1, "bulk_min_share": 0.2},
        smtp={"trusted_account": "shop"},
        accounts=[{"name": "shop", "lanes": ["transactional"]}])
    bulk = 1000
    accepted: dict[str, float] = {}
    with EngineProcess(tmp_path, config) as engine:
        with smtplib.SMTP(engine.host, engine.port) as client:
            for n in range(bulk):
                client.sendmail("s@shop.test", [f"b{n}@lane.test"],
                                f"From: s@shop.test\r\nSubject: b{n}\r\n\r\nx\r\n")
        assert wait_until(lambda: sink.messages >= 50, timeout=30)
        with smtplib.SMTP(engine.host, engine.port) as client:
            for n in range(10):
                client.sendmail("s@shop.test", [f"t{n}@lane.test"],
                                f"From: s@shop.test\r\nX-MTA-Lane: transactional\r\n"
                                f"Subject: t{n}\r\n\r\nx\r\n")
                accepted[f"t{n}@lane.test"] = time.time()
        assert wait_until(lambda: sum(m.rcpt_tos[0].startswith("t") for m in sink.received)
                          == 10, timeout=30)
        backlog = bulk - sink.messages + 10
    received = list(sink.received)
    fast = {m.rcpt_tos[0]: m for m in received if m.rcpt_tos[0].startswith("t")}
    waits = sorted(fast[r].received_at - accepted[r] for r in accepted)
    assert waits[-1] < 2.0, waits  # p99 of 10: the slowest
    assert backlog > 200, "the bulk backlog was gone before the test's mail came"
    assert all(b"x-mta-lane" not in m.data.lower() for m in fast.values())
    first = min(m.received_at for m in fast.values())
    last = max(m.received_at for m in fast.values())
    during = [m for m in received if first <= m.received_at <= last
              and m.rcpt_tos[0].startswith("b")]
    assert len(during) >= 1  # bulk kept moving (its share) while transactional went first
