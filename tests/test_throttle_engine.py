"""Adaptive throttling in a real engine: a throttling MX, a suspension rule, the pace.

The MX is bench/rig/throttle_mx.py on loopback: at most K connections and R messages/s,
421 4.7.0 beyond. The engine's shaping file sets a ceiling far above R (1000/s), so the
rate it holds is the one it found. Figures are counted at the MX (accepted, deferred at
MAIL, refused at the greeting). The machine is shared: rates and phases are small here;
bench/throttle_bench.py runs the same scenario larger.
"""

from __future__ import annotations

import asyncio
import json
import math
import smtplib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.engine_proc import read_events
from bench.rig.sinks import SinkFaults
from bench.rig.throttle_mx import BackgroundThrottleMx
from bench.throttle_bench import Scenario, analyse, format_result, run_scenario, shaping_text
from tests.helpers.engine import start_engine, wait_until

REPO = Path(__file__).resolve().parent.parent
SENDER = "news@shop.test"
FOLLOW_BOUND = 13.0  # seconds to deliver at the new rate after a change (3-s window included)


def events(tmp: Path, kind: str | None = None) -> list[dict[str, Any]]:
    return read_events(tmp / "events.jsonl", kind)


def engine_with_shaping(tmp: Path, dns: Any, port: int, scenario: Scenario,
                        **delivery: Any) -> Any:
    shaping = tmp / "shaping.toml"
    shaping.write_text(shaping_text(scenario))
    settings = {"enabled": True, "port": port, "allow_loopback_mx": True,
                "retry_initial": 300.0, "connect_timeout": 3.0, "command_timeout": 5.0,
                "connection_idle_timeout": 2.0, **delivery}
    return start_engine(tmp, dns={"nameservers": [dns.address], "timeout": 5.0},
                        delivery=settings, throttle={"shaping_file": str(shaping)})


def submit(engine: Any, recipients: list[str], count: int = 1) -> None:
    """`count` messages, each to the next recipient in turn, over one session."""
    with smtplib.SMTP(engine.host, engine.port) as client:
        for i in range(count):
            rcpt = recipients[i % len(recipients)]
            body = f"From: <{SENDER}>\r\nTo: <{rcpt}>\r\nSubject: m{i}\r\n\r\nhello\r\n"
            client.sendmail(SENDER, [rcpt], body.encode())


def throttle_status(config: Path) -> list[dict[str, Any]]:
    out = subprocess.run([sys.executable, "-m", "mta", "throttle", "status", "--json",
                          "--config", str(config)], cwd=REPO, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


# --- the engine finds R, and follows it down and up -----------------------------------------


def test_engine_holds_the_mx_rate_and_follows_its_changes(tmp_path, dns_server) -> None:
    """R, then R/3, then 2R: >= 90 % of R with <= 5 % deferred after the warm-up, and
    each change followed within FOLLOW_BOUND."""
    scenario = Scenario(rate=30.0, max_connections=3,
                        phases=[(24.0, 1.0), (12.0, 1 / 3), (16.0, 2.0)],
                        warmup=10.0, window=3.0, message_size=600, feeders=2)
    result = asyncio.run(run_scenario(tmp_path / "run", dns_server, scenario))
    report = format_result(result)
    steady, down, up = result.phases

    assert steady.goodput_share >= 0.9, report
    assert steady.deferred_share <= 0.05, report
    for phase in (down, up):
        assert phase.adapt <= FOLLOW_BOUND, report
    assert steady.adapt <= scenario.warmup + FOLLOW_BOUND, report  # from the 1000/s ceiling
    assert result.overall_deferred_share <= 0.08, report
    assert result.max_concurrent <= scenario.max_connections
    # Deferrals by "slow down" stayed ready for the destination: nothing waits for the
    # 300-s retry schedule.
    assert result.late_jobs == 0, report
    # Every change of the limits is an event, with its reason.
    changes = [e for e in events(tmp_path / "run", "ThrottleChange") if e["change"] == "rate"]
    cuts = [e for e in changes if e["new"] is not None and e["new"] < e["old"]]
    assert cuts and all("421 4.7.0" in e["reason"] for e in cuts)
    assert any(e["new"] > e["old"] for e in changes)


def test_analysis_of_samples() -> None:
    """The figures the test above relies on, from made-up counts at the MX."""
    from bench.throttle_bench import Sample, adapt_time, window_figures

    scenario = Scenario(rate=10.0, phases=[(10.0, 1.0), (10.0, 2.0)], warmup=2.0, window=2.0,
                        sample=1.0)
    samples, accepted, deferred = [], 0, 0
    for t in range(21):
        samples.append(Sample(float(t), accepted, deferred, 0))
        if t < 10:
            accepted += 10
        elif t < 14:  # slow to follow: 10/s with 2 deferred, for 4 s
            accepted, deferred = accepted + 10, deferred + 2
        else:
            accepted += 20
    assert window_figures(samples, 0.0, 10.0) == (10.0, 0.0)
    assert adapt_time(samples, 0.0, 10.0, 10.0, 2.0, 1.0) == 2.0
    assert adapt_time(samples, 10.0, 20.0, 20.0, 2.0, 1.0) == 6.0
    assert adapt_time(samples, 10.0, 13.0, 20.0, 2.0, 1.0) == math.inf
    phases = analyse(samples, scenario)
    assert phases[0].measured_from == 2.0 and phases[0].goodput_share == 1.0
    assert phases[1].measured_from == 16.0 and phases[1].goodput == 20.0
    assert phases[1].deferred_share == 0.0


# --- "slow down" keeps a message ready; it does not take the retry schedule -----------------


def test_slow_down_deferrals_are_retried_in_seconds_not_minutes(tmp_path, dns_server) -> None:
    """With retry_initial = 300 s, mail deferred by an MX that is too busy (421 at the
    greeting over K connections, 421 at MAIL over R) is still delivered within seconds."""
    count, rate = 40, 8.0
    with BackgroundThrottleMx(host="127.0.0.2", max_connections=2, rate=rate) as mx:
        dns_server.add_mx("busy.test", [(10, "mx.busy.test")])
        dns_server.add_a("mx.busy.test", "127.0.0.2")
        engine = engine_with_shaping(tmp_path, dns_server, mx.port, Scenario())
        try:
            started = time.time()
            submit(engine, [f"u{i}@busy.test" for i in range(count)], count)
            delivered = wait_until(lambda: len(events(tmp_path, "Delivery")) == count,
                                   timeout=count / rate + 20)
            took = time.time() - started
        finally:
            engine.stop()
        stats = mx.stats
    assert delivered, f"{len(events(tmp_path, 'Delivery'))} of {count} delivered"
    # The engine hit both limits: connections over K (421 at the greeting), and R (421 at MAIL).
    assert stats.refused > 0 and stats.deferred > 0
    assert stats.max_concurrent <= 2
    deferred = events(tmp_path, "TransientFailure")
    assert deferred and all(e["code"] == 421 for e in deferred)
    assert {e["recipient"] for e in deferred} <= {e["recipient"]
                                                   for e in events(tmp_path, "Delivery")}
    assert took < count / rate + 15, took  # not 300 s for any of them


# --- a suspension rule: one destination held, the others flow, then it lifts ----------------


TS03 = "421 4.7.0 [TS03] All messages from 127.0.0.1 will be permanently deferred"
SUSPEND_RULE = ('[[rule]]\nname = "ts03"\nregex = "TS03"\naction = "suspend"\n'
                'duration = "5s"\n')


def test_suspension_rule_holds_one_destination_and_lifts(tmp_path, dns_server,
                                                          asyncio_sink_factory) -> None:
    held = asyncio_sink_factory(host="127.0.0.3", faults=SinkFaults(mail_reply=TS03))
    flowing = asyncio_sink_factory(host="127.0.0.4", port=held.port)
    dns_server.add_mx("held.test", [(10, "mx.held.test")])
    dns_server.add_a("mx.held.test", "127.0.0.3")
    dns_server.add_mx("flowing.test", [(10, "mx.flowing.test")])
    dns_server.add_a("mx.flowing.test", "127.0.0.4")
    engine = engine_with_shaping(tmp_path, dns_server, held.port,
                                 Scenario(rules=SUSPEND_RULE), retry_initial=1.0)
    statuses: list[dict[str, Any]] = []
    sessions_held = -1
    try:
        submit(engine, ["first@held.test"])
        assert wait_until(lambda: [e for e in events(tmp_path, "ThrottleChange")
                                   if e["change"] == "suspend"], timeout=10)
        held.faults.mail_reply = ""  # it would take mail now: only the rule holds it back
        suspend = next(e for e in events(tmp_path, "ThrottleChange") if e["change"] == "suspend")
        until = suspend["until"]
        for i in range(6):  # while it is suspended, both destinations get mail
            submit(engine, [f"late{i}@held.test", f"f{i}@flowing.test"], 2)
            time.sleep(0.3)
        while time.time() < until - 0.5 and not statuses:
            rows = throttle_status(engine.config_path)
            statuses = [r for r in rows if r["state"] == "suspended"]
        if time.time() < until - 0.1:
            sessions_held = held.sessions
        assert wait_until(lambda: held.accepted == 7, timeout=until - time.time() + 10)
        assert wait_until(lambda: len([e for e in events(tmp_path, "Delivery")  # recorded
                                       if e["recipient"].endswith("@held.test")]) == 7)
    finally:
        engine.stop()

    assert suspend["destination"] == "mx:mx.held.test" and "TS03" in suspend["reason"]
    assert 4.5 <= until - suspend["time"] <= 5.5
    # Only that destination was suspended, and the suspension was lifted after its time.
    changes = events(tmp_path, "ThrottleChange")
    assert {e["destination"] for e in changes if e["change"] == "suspend"} == {"mx:mx.held.test"}
    lifted = [e for e in changes if e["change"] == "suspend_lifted"]
    assert lifted and lifted[0]["destination"] == "mx:mx.held.test"
    assert lifted[0]["time"] >= until
    # `mta throttle status` showed it suspended, with the reason and until when.
    assert statuses, "mta throttle status never showed the suspension"
    assert [r["destination"] for r in statuses] == ["mx:mx.held.test"]
    assert "TS03" in statuses[0]["reason"] and abs(statuses[0]["until"] - until) < 0.01
    # The other destination kept flowing during the suspension ...
    during = [m for m in flowing.received if suspend["time"] < m.received_at < until]
    assert len(during) == 6 and flowing.accepted == 6
    # ... and the held one got nothing until it was lifted (one session: the TS03 one).
    assert all(m.received_at >= until - 0.05 for m in held.received)
    assert sessions_held == 1
    # Mail that arrived during the suspension waited without counting an attempt.
    attempts = {e["recipient"]: e["attempt"] for e in events(tmp_path, "Delivery")}
    assert attempts["first@held.test"] == 2
    assert all(attempts[f"late{i}@held.test"] == 1 for i in range(6))
