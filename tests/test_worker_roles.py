"""Workers of their own for delivery (`[engine] delivery_workers`): the seats the engine
hands out, and a real engine whose accepting and delivering workers are separate
processes, delivering through loopback DNS to a sink, surviving a delivering worker's
kill -9; and the one-line stop when two listeners share an address."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.engine_proc import read_events
from bench.rig.dns import DnsServer
from bench.rig.sinks import AsyncioSink
from mta.config import ConfigError, load_config
from mta.context import Role, seats
from mta.queue.spool import domain_hash
from tests.helpers.engine import wait_until
from tests.helpers.http import HttpEngine, call, start_http_engine

DOMAINS = [f"d{i}.test" for i in range(8)]


def test_by_default_every_worker_accepts_and_delivers_its_share() -> None:
    both = seats(2, 0)
    assert [(s.index, s.workers, s.role, s.share, s.sharers) for s in both] == [
        (0, 2, Role.ACCEPT_AND_DELIVER, 0, 2), (1, 2, Role.ACCEPT_AND_DELIVER, 1, 2)]
    assert [s.leader for s in both] == [True, False]
    assert [s.delivery_leader for s in both] == [True, False]


def test_delivery_workers_come_after_the_accepting_ones_and_split_the_destinations() -> None:
    split = seats(2, 3)
    assert [s.index for s in split] == [0, 1, 2, 3, 4] and {s.workers for s in split} == {5}
    assert [s.role for s in split] == [Role.ACCEPT] * 2 + [Role.DELIVER] * 3
    assert [s.accepts for s in split] == [True, True, False, False, False]
    assert [s.delivers for s in split] == [False, False, True, True, True]
    assert [s.share for s in split if s.delivers] == [0, 1, 2]
    assert {s.sharers for s in split} == {3}
    assert [s.leader for s in split] == [True, False, False, False, False]  # HTTP, outbox
    assert [s.delivery_leader for s in split] == [False, False, True, False, False]


@pytest.mark.parametrize("line, problem", [
    ("delivery_workers = -1", "[engine] workers and delivery_workers must be 0 or more"),
    ('delivery_priority = "low"', "[engine] delivery_priority must be idle or normal"),
])
def test_bad_worker_settings_stop_the_engine_with_one_line(tmp_path: Path, line: str,
                                                           problem: str) -> None:
    path = tmp_path / "mta.toml"
    path.write_text(f"[engine]\n{line}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value).startswith(problem) and "\n" not in str(exc.value)


def test_two_listeners_on_one_address_stop_the_engine_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "mta.toml"
    path.write_text('[smtp]\nlisten = "127.0.0.1:2600"\n[http]\nlisten = "127.0.0.1:2600"\n')
    with pytest.raises(ConfigError, match=r"^\[http\] listen and \[smtp\] listen are the same "
                                          r"address \(127.0.0.1:2600\)$"):
        load_config(path)
    path.write_text('[http]\nenabled = false\nlisten = "127.0.0.1:2525"\n')
    assert load_config(path).smtp.listen == "127.0.0.1:2525"  # no HTTP listener: no clash


def names(engine: HttpEngine) -> dict[int, str]:
    """The workers' pids and the names they give themselves (comm, shown by ps and top)."""
    found: dict[int, str] = {}
    for pid in engine.worker_pids():
        try:
            found[pid] = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue  # exited meanwhile
    return found


def pids_named(engine: HttpEngine, prefix: str) -> list[int]:
    return [pid for pid, name in names(engine).items() if name.startswith(prefix)]


def throttle_rows(engine: HttpEngine) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "mta", "throttle", "status", "--json",
                          "--config", str(engine.config_path)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def send(engine: HttpEngine, rcpts: list[str], tag: str) -> None:
    with smtplib.SMTP(engine.host, engine.port) as client:
        for i, rcpt in enumerate(rcpts):
            client.sendmail("", [rcpt], (f"From: shop@shop.test\r\nTo: {rcpt}\r\n"
                                         f"Subject: {tag} {i}\r\n\r\nhello\r\n").encode())


def test_an_engine_with_delivery_workers_accepts_in_some_and_delivers_in_the_others(
        tmp_path: Path, dns_server: DnsServer,
        asyncio_sink_factory: Callable[..., AsyncioSink]) -> None:
    sink = asyncio_sink_factory("127.0.0.2")
    for domain in DOMAINS:
        dns_server.add_mx(domain, [(10, "mx.sink.test")])
    dns_server.add_a("mx.sink.test", "127.0.0.2")
    assert {domain_hash(d) % 2 for d in DOMAINS} == {0, 1}  # both delivering workers have some
    engine = start_http_engine(
        tmp_path / "engine", workers=1, engine={"delivery_workers": 2},
        dns={"nameservers": [dns_server.address]},
        delivery={"enabled": True, "port": sink.port, "allow_loopback_mx": True,
                  "retry_initial": 3600.0})
    events = tmp_path / "engine" / "events.jsonl"
    try:
        assert wait_until(lambda: sorted(names(engine).values()) == [
            "mta-delivery-1", "mta-delivery-2", "mta-intake-0"]), names(engine)
        [intake] = pids_named(engine, "mta-intake")
        delivering = pids_named(engine, "mta-delivery")
        assert wait_until(lambda: all(os.sched_getscheduler(pid) == os.SCHED_IDLE
                                      for pid in delivering))  # their event loops
        assert os.sched_getscheduler(intake) == os.SCHED_OTHER
        assert len(os.sched_getaffinity(intake)) == 1  # it keeps one CPU

        rcpts = [f"user{i}@{DOMAINS[i % len(DOMAINS)]}" for i in range(24)]
        send(engine, rcpts, "first")
        assert wait_until(lambda: len(read_events(events, "Delivery")) == 24, timeout=30), \
            engine.log_text()[-2000:]
        assert {e["worker"] for e in read_events(events, "Reception")} == {0}
        by_worker = {e["worker"]: e for e in read_events(events, "Delivery")}
        assert set(by_worker) == {1, 2}  # each delivering worker its own destinations
        for worker in (1, 2):
            domains = {e["domain"] for e in read_events(events, "Delivery")
                       if e["worker"] == worker}
            assert {domain_hash(d) % 2 for d in domains} == {worker - 1}
        assert sink.wait_for(messages=24, timeout=10)

        # The HTTP listener is the accepting worker's; its /metrics adds up the others'.
        status, text, _ = call(engine.url + "/metrics", token=None)
        assert status == 200 and "mta_messages_delivered_total" in text
        # `mta throttle status` names the delivering workers by their own numbers.
        assert wait_until(lambda: {row["worker"] for row in throttle_rows(engine)} == {1, 2})

        # A delivering worker killed: the supervisor starts another in the same seat.
        victim = delivering[0]
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: len(pids_named(engine, "mta-delivery")) == 2
                          and victim not in pids_named(engine, "mta-delivery"), timeout=20)
        send(engine, rcpts, "second")
        assert wait_until(lambda: len(read_events(events, "Delivery")) == 48, timeout=30), \
            engine.log_text()[-2000:]
        assert sink.wait_for(messages=48, timeout=10)
        assert len(pids_named(engine, "mta-intake")) == 1
    finally:
        engine.stop()


def test_delivery_at_normal_priority_when_configured(
        tmp_path: Path, dns_server: DnsServer) -> None:
    engine = start_http_engine(
        tmp_path / "engine", workers=1,
        engine={"delivery_workers": 1, "delivery_priority": "normal"},
        dns={"nameservers": [dns_server.address]}, delivery={"enabled": True})
    try:
        assert wait_until(lambda: len(pids_named(engine, "mta-delivery")) == 1)
        [pid] = pids_named(engine, "mta-delivery")
        assert os.sched_getscheduler(pid) == os.SCHED_OTHER
    finally:
        engine.stop()
