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
from pathlib import Path

from bench.engine_proc import EngineProcess, read_events
from mta.queue.drain import DrainTrace, parse_trace, trace_value
from tests.helpers.engine import engine_config, spooled_ids, wait_until

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def test_trace_round_trip() -> None:
    trace = DrainTrace("shop; x", "spring=1", 1765000000.25, 3, "a.example", 1765000100.0,
                       "transactional")
    assert parse_trace(trace_value(trace)) == trace
    assert parse_trace("nonsense") is None and parse_trace("received=soon") is None


def _drain(config: Path, to: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "mta", "node", "drain", "--to", to,
                             "--config", str(config), "--json"], cwd=PROJECT_ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=str(PROJECT_ROOT)))


def test_drain_to_another_node_survives_kill9(tmp_path, dns_server,
                                              asyncio_sink_factory) -> None:
    import tomli_w

    sink = asyncio_sink_factory(host="127.0.0.2", record=True)
    domains = [f"d{i}.drain.test" for i in range(10)]
    for domain in domains:
        dns_server.add_mx(domain, [(10, "mx.drain.test")])
    dns_server.add_a("mx.drain.test", "127.0.0.2")
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    a_config = engine_config(a_dir, smtp={"trusted_account": "shop"})  # delivers nowhere
    b_config = engine_config(b_dir, dns={"nameservers": [dns_server.address], "timeout": 5.0},
                             delivery={"enabled": True, "port": sink.port,
                                       "allow_loopback_mx": True})
    a_path = a_dir / "mta.toml"
    a_path.write_text(tomli_w.dumps(a_config))
    count = 5000
    recipients = [f"u{n}@{domains[n % len(domains)]}" for n in range(count)]
    a = EngineProcess(a_dir, a_config).start()
    with smtplib.SMTP(a.host, a.port) as client:
        for n, rcpt in enumerate(recipients):
            client.sendmail("s@shop.test", [rcpt],
                            f"From: s@shop.test\r\nX-Campaign-ID: spring\r\n"
                            f"Subject: m{n}\r\n\r\nbody {n}\r\n")
    b = EngineProcess(b_dir, b_config).start()
    try:
        to = f"{b.host}:{b.port}"
        first = _drain(a_path, to)
        assert wait_until(lambda: len(read_events(b_dir / "events.jsonl", "Reception")) >= 300,
                          timeout=60)
        first.send_signal(signal.SIGKILL)  # the drain, and node A, die mid-way
        first.wait(10)
        a.kill9()
        a = EngineProcess(a_dir, a_config).start()
        second = _drain(a_path, to)  # resumes where it was
        out, err = second.communicate(timeout=120)
        assert second.returncode == 0, err
        resumed = json.loads(out)["messages"]
        assert 0 < resumed < count, resumed  # the first one was cut off mid-way
        assert "Traceback" not in err
        assert wait_until(lambda: len({m.rcpt_tos[0] for m in sink.received}) >= count,
                          timeout=120)
    finally:
        a.stop()
        b.stop()
    got = [m.rcpt_tos[0] for m in sink.received]
    assert set(got) == set(recipients)  # none lost
    duplicates = len(got) - len(set(got))
    assert duplicates <= 5, duplicates  # at-least-once: only around the kill
    assert not spooled_ids(a_dir / "spool")  # nothing left on A
    assert all(b"x-mta-drained" not in m.data.lower() for m in sink.received)
    assert all(re.search(rb"(?i)x-campaign-id: spring", m.data) for m in sink.received)
    receptions = read_events(b_dir / "events.jsonl", "Reception")
    assert {(e["account"], e["campaign"]) for e in receptions} == {("shop", "spring")}
