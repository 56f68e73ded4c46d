"""Crashes: kill -9 of the whole engine while mail flows in and out; nothing accepted is lost."""

from __future__ import annotations

import asyncio
import re
import threading
from pathlib import Path

from bench.engine_proc import EngineProcess
from bench.load import Submission, make_body, run_load
from tests.helpers.engine import engine_config, wait_until
from tests.test_delivery import events, submit

QUEUE_ID = re.compile(rb"with E?SMTPS?A? id ([0-9A-F]{20})")


def delivering_config(tmp: Path, dns, port: int) -> dict:
    return engine_config(tmp, dns={"nameservers": [dns.address], "timeout": 5.0},
                         delivery={"enabled": True, "port": port, "allow_loopback_mx": True,
                                   "retry_initial": 1.0, "retry_max": 1.0,
                                   "max_connections_per_destination": 4})


def route_domains(dns, count: int) -> list[str]:
    domains = [f"d{i}.crash.test" for i in range(count)]
    for d in domains:
        dns.add_mx(d, [(10, "mx.crash.test")])
    dns.add_a("mx.crash.test", "127.0.0.2")
    return domains


def queue_ids_at(sink) -> list[str]:
    return [m.group(1).decode() for r in sink.received if (m := QUEUE_ID.search(r.data))]


def test_kill_after_remote_accepted_resends_as_possible_duplicate(tmp_path, dns_server,
                                                                   asyncio_sink_factory) -> None:
    sink = asyncio_sink_factory(host="127.0.0.2", record=True)
    route_domains(dns_server, 1)
    config = delivering_config(tmp_path, dns_server, sink.port)
    crashing = EngineProcess(tmp_path, config, env={"MTA_FAILPOINT": "after_remote_accept"})
    crashing.start()
    submit(crashing, ["x@d0.crash.test"])
    assert crashing.proc is not None and crashing.proc.wait(15) is not None  # it killed itself
    assert sink.accepted == 1 and not events(tmp_path, "Delivery")
    with EngineProcess(tmp_path, config):
        assert wait_until(lambda: events(tmp_path, "Delivery"), timeout=15)
    assert sink.accepted == 2
    assert events(tmp_path, "Delivery")[0].get("possible_duplicate") is True


def _load(host: str, port: int, domains: list[str], accepted: list[str], seconds: float) -> None:
    def make(i: int) -> Submission:
        rcpt = f"u{i}@{domains[i % len(domains)]}"
        return Submission("s@shop.test", [rcpt], make_body(2048, f"m{i}", "s@shop.test", rcpt))

    asyncio.run(run_load(host, port, make, 10**6, sessions=20, duration=seconds,
                         on_accept=lambda qid, t: accepted.append(qid)))


def test_repeated_kill9_while_streaming_and_delivering_loses_nothing(
        tmp_path, dns_server, asyncio_sink_factory) -> None:
    sink = asyncio_sink_factory(host="127.0.0.2", record=True)
    domains = route_domains(dns_server, 10)
    config = delivering_config(tmp_path, dns_server, sink.port)
    accepted: list[str] = []
    kills = 3
    for round_ in range(kills):
        engine = EngineProcess(tmp_path, config, workers=2).start()
        before = len(accepted)
        load = threading.Thread(target=_load, args=(engine.host, engine.port, domains,
                                                    accepted, 3.0))
        load.start()
        assert wait_until(lambda b=before: len(accepted) > b + 100 and sink.accepted > 0,
                          timeout=20), f"round {round_}: no flow"
        engine.kill9()
        load.join(30)
    with EngineProcess(tmp_path, config, workers=2):  # the spool opens cleanly; it drains
        assert wait_until(lambda: set(accepted) <= set(queue_ids_at(sink)), timeout=60)
    at_sink = queue_ids_at(sink)
    duplicates = len(at_sink) - len(set(at_sink))
    # Only deliveries in flight at a kill may arrive twice: at most the open connections.
    assert duplicates <= kills * 2 * 4, duplicates
