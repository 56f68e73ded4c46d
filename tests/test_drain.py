"""Draining a node: its queued mail handed to another engine over SMTP with its history
in a trace field; removed here only after the other said 250; resumable after kill -9."""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import tomli_w

from bench.engine_proc import EngineProcess, read_events
from mta.queue.drain import (
    DRAIN_HOLD,
    Drain,
    DrainDeferred,
    DrainTrace,
    drain_hold,
    original_hold,
    parse_trace,
    received_hold,
    trace_value,
)
from mta.queue.rules import add_rule, new_rule, read_rules
from mta.queue.spool import NewMessage, Spool
from tests.helpers.engine import engine_config, spooled_ids, wait_until
from tests.helpers.http import TOKEN, call

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def test_trace_round_trip() -> None:
    trace = DrainTrace("shop; x", "spring=1", 1765000000.25, 3, "a.example", 1765000100.0,
                       "transactional")
    assert parse_trace(trace_value(trace)) == trace
    held = DrainTrace("shop", "", 1765000000.25, 0, "a", 0.0, "", "suspend:domain:x.test",
                      1765003600.5, "warm pool")
    assert parse_trace(trace_value(held)) == held
    assert drain_hold("") == DRAIN_HOLD and original_hold(DRAIN_HOLD) == ""
    assert original_hold(drain_hold("campaign:shop/c")) == "campaign:shop/c"
    assert original_hold("review") == "review"
    assert parse_trace("nonsense") is None and parse_trace("received=soon") is None


def _drain(config: Path, to: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "mta", "node", "drain", "--to", to,
                             "--config", str(config), "--json"], cwd=PROJECT_ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=str(PROJECT_ROOT)))


def _spool(path: Path) -> Spool:
    return Spool(path, map_size=64 * 1024**2)


def _jobs(spool: Spool) -> dict[str, Any]:
    with spool.read() as txn:
        return {r.address: job for job in spool.jobs(txn) for r in job.rcpts}


def test_partial_acceptance_removes_only_the_accepted(tmp_path: Path) -> None:
    spool = _spool(tmp_path / "spool")
    message = NewMessage("s@shop.test", ["a@x.test", "b@x.test", "c@y.test"], b"m\r\n",
                         account="shop")
    spool.apply([spool.store_op(message)])
    sent: list[list[str]] = []

    def send(sender: str, recipients: list[str], data: bytes) -> dict[str, tuple[int, bytes]]:
        sent.append(recipients)
        return {"b@x.test": (550, b"5.1.1 no such user")}

    report = Drain(spool, send, "a.node").run()
    assert sent == [["a@x.test", "b@x.test", "c@y.test"]]
    assert (report.sent, report.recipients, report.kept, report.refused) == (
        1, 2, 1, [message.id])
    left = _jobs(spool)
    assert set(left) == {"a@x.test", "b@x.test"}  # c's job went; x's keeps b
    assert left["b@x.test"].waiting() == ["b@x.test"] and not left["b@x.test"].held
    again = Drain(spool, send, "a.node")
    sent.clear()
    assert again.run().recipients == 0 and sent == [["b@x.test"]]  # never a@x.test again

    def later(sender: str, recipients: list[str], data: bytes) -> dict[str, tuple[int, bytes]]:
        return {r: (451, b"4.3.0 later") for r in recipients}

    try:
        Drain(spool, later, "a.node").run()
        raise AssertionError("a refusal for now must stop the drain")
    except DrainDeferred:
        pass
    assert _jobs(spool)["b@x.test"].waiting() == ["b@x.test"]  # kept for the next run
    assert not _jobs(spool)["b@x.test"].held  # given back: this node delivers it meanwhile
    spool.close()


def test_a_stopped_drain_gives_the_taken_messages_back(tmp_path: Path) -> None:
    spool = _spool(tmp_path / "spool")
    now = time.time()
    rule = new_rule("suspend", "domain", "held.test", duration=600, now=now)
    spool.apply([lambda txn: add_rule(spool, txn, rule, now)])
    spool.apply([spool.store_op(NewMessage("s@shop.test", [rcpt], b"m\r\n", hold=hold))
                 for rcpt, hold in (("a@held.test", rule.hold_reason), ("b@x.test", ""),
                                    ("c@x.test", "campaign:shop/c"))])
    calls: list[list[str]] = []

    def gone(sender: str, recipients: list[str], data: bytes) -> dict[str, tuple[int, bytes]]:
        calls.append(recipients)
        if len(calls) > 1:
            raise smtplib.SMTPServerDisconnected("the other node went away")
        return {}

    try:
        Drain(spool, gone, "a.node").run()
        raise AssertionError("the drain must stop when the other node is gone")
    except smtplib.SMTPServerDisconnected:
        pass
    left = _jobs(spool)
    assert len(calls) == 2 and calls[0][0] not in left  # the first went over
    assert {r: left[r].held for r in left} == {  # the others: as they were
        r: h for r, h in (("a@held.test", rule.hold_reason), ("b@x.test", ""),
                          ("c@x.test", "campaign:shop/c")) if r in left}
    assert len(left) == 2
    spool.close()


def test_held_jobs_keep_their_hold(tmp_path: Path) -> None:
    spool = _spool(tmp_path / "a")
    now = time.time()
    message = NewMessage("s@shop.test", ["a@held.test", "b@free.test"], b"m\r\n",
                         account="shop", send_at=now + 3600)  # not due: held at once
    spool.apply([spool.store_op(message)])
    rule = new_rule("suspend", "domain", "held.test", duration=600, now=now, reason="outage")
    spool.apply([lambda txn: add_rule(spool, txn, rule, now)])
    assert _jobs(spool)["a@held.test"].held == rule.hold_reason
    traces: list[DrainTrace] = []

    def send(sender: str, recipients: list[str], data: bytes) -> dict[str, tuple[int, bytes]]:
        first = data.split(b"\r\n", 1)[0].decode()
        trace = parse_trace(first.partition(": ")[2])
        assert trace is not None
        traces.append(trace)
        return {}

    report = Drain(spool, send, "a.node").run()
    assert (report.sent, report.recipients, report.held) == (1, 2, 1)
    by_hold = {t.held: t for t in traces}  # one transaction per hold
    assert set(by_hold) == {"", rule.hold_reason}
    assert abs(by_hold[rule.hold_reason].held_until - rule.expires) < 0.001
    assert _jobs(spool) == {}
    spool.close()

    other = _spool(tmp_path / "b")  # the receiving side: the rule comes along
    trace = by_hold[rule.hold_reason]
    [(hold, carried)] = other.apply([lambda txn: received_hold(other, txn, trace, now)])
    assert hold == rule.hold_reason and carried is not None
    assert (carried.value, carried.by) == ("held.test", "drain:a.node")
    assert abs(carried.expires - rule.expires) < 0.001
    [(hold, carried)] = other.apply([lambda txn: received_hold(other, txn, trace, now)])
    assert hold == rule.hold_reason and carried is None  # it is there already
    with other.read() as txn:
        assert len(read_rules(other, txn)) == 1
    gone = DrainTrace(held="suspend:domain:old.test", held_until=now - 1, node="a.node")
    [(hold, _)] = other.apply([lambda txn: received_hold(other, txn, gone, now)])
    assert hold == ""  # an expired suspension holds nothing
    paused = DrainTrace(held="campaign:shop/c", node="a.node")
    [(hold, carried)] = other.apply([lambda txn: received_hold(other, txn, paused, now)])
    assert (hold, carried) == ("campaign:shop/c", None)
    other.close()


def _queue_suspended(spool_path: Path, recipients: list[str]) -> None:
    """Mail queued on a node whose destinations an operator suspended for an hour: the
    rules and the held jobs, as `mta queue suspend --domain` leaves them."""
    spool = _spool(spool_path)
    now = time.time()
    rules = {}
    for domain in sorted({r.rpartition("@")[2] for r in recipients}):
        rules[domain] = new_rule("suspend", "domain", domain, duration=3600, now=now,
                                 reason="drain test")
        spool.apply([lambda txn, rule=rules[domain]: add_rule(spool, txn, rule, now)])
    messages = [NewMessage("s@shop.test", [rcpt],
                           f"From: s@shop.test\r\nX-Campaign-ID: spring\r\nSubject: m{n}\r\n"
                           f"\r\nbody {n}\r\n".encode(), account="shop", campaign="spring",
                           hold=rules[rcpt.rpartition("@")[2]].hold_reason)
                for n, rcpt in enumerate(recipients)]
    for first in range(0, len(messages), 500):
        [result] = spool.apply([spool.store_many_op(messages[first:first + 500])])
        assert not isinstance(result, BaseException), result
    spool.close()


def _holds(spool_path: Path) -> set[str]:
    spool = Spool(spool_path, readonly=True)
    try:
        with spool.read() as txn:
            return {j.held for j in spool.jobs(txn)}
    finally:
        spool.close()


def _queued(spool_path: Path) -> int:
    spool = Spool(spool_path, readonly=True)
    try:
        with spool.read() as txn:
            return sum(len(j.waiting()) for j in spool.jobs(txn))
    finally:
        spool.close()


def test_drain_to_another_node_survives_kill9_of_either(tmp_path, dns_server,
                                                      asyncio_sink_factory) -> None:
    sink = asyncio_sink_factory(host="127.0.0.2", record=True)
    domains = [f"d{i}.drain.test" for i in range(10)]
    for domain in domains:
        dns_server.add_mx(domain, [(10, "mx.drain.test")])
    dns_server.add_a("mx.drain.test", "127.0.0.2")
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    a_config = engine_config(a_dir, smtp={"trusted_account": "shop"},
                             dns={"nameservers": [dns_server.address], "timeout": 5.0},
                             delivery={"enabled": True, "port": sink.port,
                                       "allow_loopback_mx": True})
    b_config = engine_config(b_dir, dns={"nameservers": [dns_server.address], "timeout": 5.0},
                             delivery={"enabled": True, "port": sink.port,
                                       "allow_loopback_mx": True})
    b_config["http"]["admin_token"] = TOKEN
    a_path = a_dir / "mta.toml"
    a_path.write_text(tomli_w.dumps(a_config))
    count = 5000
    recipients = [f"u{n}@{domains[n % len(domains)]}" for n in range(count)]
    _queue_suspended(a_dir / "spool", recipients)  # held: A sends none of them
    a = EngineProcess(a_dir, a_config).start()
    assert _queued(a_dir / "spool") == count
    b = EngineProcess(b_dir, b_config).start()
    receptions = lambda: len(read_events(b_dir / "events.jsonl", "Reception"))  # noqa: E731
    to = f"{b.host}:{b.port}"
    try:
        # 1. kill -9 of A (and of the drain) mid-way, A restarted.
        first = _drain(a_path, to)
        assert wait_until(lambda: receptions() >= 300, timeout=90)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        a.kill9()
        a = EngineProcess(a_dir, a_config).start()
        # 2. kill -9 of B mid-way: the drain says so and keeps the rest.
        second = _drain(a_path, to)
        mark = receptions()
        assert wait_until(lambda: receptions() >= mark + 300, timeout=90)
        b.kill9()
        out, err = second.communicate(timeout=120)
        assert second.returncode != 0 and "stopped" in err and "resume" in err, (out, err)
        assert "Traceback" not in err
        kept = _queued(a_dir / "spool")
        assert 0 < kept < count, kept
        assert _holds(a_dir / "spool") == {f"suspend:domain:{d}" for d in domains}  # given back
        # 3. B back: the drain resumes where it was and finishes.
        b = EngineProcess(b_dir, b_config).start()
        third = _drain(a_path, to)
        out, err = third.communicate(timeout=180)
        assert third.returncode == 0, err
        report = json.loads(out)
        assert 0 < report["messages"] <= kept and report["held"] == report["recipients"]
        assert _queued(a_dir / "spool") == 0
        # The suspensions came along: B holds the mail until they are lifted there.
        status, body, _ = call(f"http://{b_config['http']['listen']}/api/v1/queue/rules")
        assert status == 200
        carried = {r["value"] for r in body["rules"] if r["by"].startswith("drain:")}
        assert carried == set(domains), (body["rules"], read_events(
            b_dir / "events.jsonl", "QueueRuleAdded"), read_events(b_dir / "events.jsonl",
                                                                   "QueueRuleLifted"))
        assert len(sink.received) == 0  # held on B too
        for domain in domains:
            status, done, _ = call(f"http://{b_config['http']['listen']}/api/v1/queue/resume",
                                   "POST", body={"scope": "domain", "value": domain})
            assert status == 200, done
        assert wait_until(lambda: len({m.rcpt_tos[0] for m in sink.snapshot()}) >= count,
                          timeout=180)
    finally:
        a.stop()
        b.stop()
    got = [m.rcpt_tos[0] for m in sink.received]
    assert set(got) == set(recipients)  # none lost
    duplicates = len(got) - len(set(got))
    print(f"drain: {count} messages, {duplicates} duplicates (at-least-once, around the kills)")
    assert duplicates <= 10, duplicates
    assert not spooled_ids(a_dir / "spool")  # nothing left on A
    assert all(b"x-mta-drained" not in m.data.lower() for m in sink.received)
    assert all(re.search(rb"(?i)x-campaign-id: spring", m.data) for m in sink.received)
    receptions_b = read_events(b_dir / "events.jsonl", "Reception")
    assert {(e["account"], e["campaign"]) for e in receptions_b} == {("shop", "spring")}
