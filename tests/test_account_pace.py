"""Per-account rates: `[[accounts]] max_rate`, a GCRA pace; over it mail is accepted and
paced out, never refused. Units, then an engine with two workers on loopback."""

from __future__ import annotations

import asyncio
import smtplib

import pytest

from bench.engine_proc import EngineProcess, read_events
from mta.audit import read_audit
from mta.config import AccountConfig, ConfigError, build_section
from mta.throttle.account_pace import AccountPaces, parse_rate
from mta.throttle.gcra import Gcra
from tests.helpers.engine import engine_config


def test_parse_rate() -> None:
    assert parse_rate("500/m") == pytest.approx(500 / 60)
    assert parse_rate("10/s") == 10 and parse_rate("3600 / h") == 1
    assert parse_rate("86400/day") == 1
    for bad in ("", "500", "0/m", "-1/s", "5/week", "five/m"):
        with pytest.raises(ValueError):
            parse_rate(bad)
    with pytest.raises(ConfigError, match="max_rate: .fast. is not a rate"):
        build_section(AccountConfig, {"name": "shop", "max_rate": "fast"}, "[accounts]")


def test_gcra_reserve_hands_out_turns_in_order() -> None:
    gcra = Gcra(2.0)
    assert [gcra.reserve(100.0) for _ in range(4)] == [0.0, 0.5, 1.0, 1.5]
    assert gcra.reserve(103.0) == 0.0


def test_account_paces_local_share_per_worker() -> None:
    now = [50.0]
    told: list[tuple[str, float]] = []
    paces = AccountPaces({"shop": 10.0}, None, workers=2, clock=lambda: now[0],
                         on_wait=lambda account, wait: told.append((account, wait)))
    waits = [asyncio.run(paces.reserve("shop")) for _ in range(3)]
    assert waits == [0.0, pytest.approx(0.2), pytest.approx(0.4)]  # 5/s on this worker
    assert told == [("shop", 0.2)]  # at most once a second
    assert asyncio.run(paces.reserve("other")) == 0.0 and not paces.paced("other")
    assert paces.queue_wait() == {"shop": pytest.approx(0.4)}


class _Shared:
    def __init__(self, answer: float | None) -> None:
        self.answer = answer
        self.asked: list[tuple[str, float, int]] = []

    async def pace(self, scope: str, rate: float, burst: int) -> float | None:
        self.asked.append((scope, rate, burst))
        return self.answer


def test_account_paces_ask_the_shared_pace_first() -> None:
    shared = _Shared(0.75)
    paces = AccountPaces({"shop": 10.0}, shared, workers=2)  # type: ignore[arg-type]
    assert asyncio.run(paces.reserve("shop")) == 0.75
    assert shared.asked == [("account:shop", 10.0, 1)]  # the whole engine's rate
    shared.answer = None  # Redis cannot answer: the local share applies
    assert asyncio.run(paces.reserve("shop")) == 0.0


def test_paced_account_mail_is_accepted_and_paced_out(tmp_path, dns_server,
                                                      asyncio_sink_factory) -> None:
    sink = asyncio_sink_factory(host="127.0.0.2", record=True)
    domains = [f"d{i}.pace.test" for i in range(4)]
    for domain in domains:
        dns_server.add_mx(domain, [(10, "mx.pace.test")])
    dns_server.add_a("mx.pace.test", "127.0.0.2")
    config = engine_config(
        tmp_path, dns={"nameservers": [dns_server.address], "timeout": 5.0},
        delivery={"enabled": True, "port": sink.port, "allow_loopback_mx": True},
        smtp={"trusted_account": "shop"},
        accounts=[{"name": "shop", "max_rate": "10/s"}, {"name": "free"}])
    count = 20
    with EngineProcess(tmp_path, config, workers=2) as engine:
        with smtplib.SMTP(engine.host, engine.port) as client:
            for n in range(count):  # every one accepted at once
                rcpt = f"u{n}@{domains[n % len(domains)]}"
                client.sendmail("s@shop.test", [rcpt],
                                f"From: s@shop.test\r\nTo: {rcpt}\r\nSubject: {n}\r\n\r\nx\r\n")
        assert sink.wait_for(messages=count, timeout=30)
    times = sorted(m.received_at for m in sink.received)
    span = times[-1] - times[0]
    # 10/s for the account: 20 messages take at least ~1.9 s (5/s on each of 2 workers)
    assert span >= 1.6, span
    assert span < 10, span  # paced, not stalled
    assert sink.messages == count
    paced = read_events(tmp_path / "events.jsonl", "AccountPaced")
    assert paced and all(e["account"] == "shop" and e["queue_wait"] > 0 for e in paced)


def test_campaign_rates_are_kept_in_the_spool_and_paced(tmp_path) -> None:
    from mta.queue.rules import RateCache, campaign_rates, set_campaign_rate
    from mta.queue.spool import Spool

    spool = Spool(tmp_path / "spool", map_size=64 * 1024**2)
    spool.apply([lambda txn: set_campaign_rate(spool, txn, "shop", "spring", 2.0),
                 lambda txn: set_campaign_rate(spool, txn, "shop", "gone", 1.0),
                 lambda txn: set_campaign_rate(spool, txn, "shop", "gone", None)])
    with spool.read() as txn:
        assert campaign_rates(spool, txn) == {("shop", "spring"): 2.0}
    now = [10.0]
    paces = AccountPaces({"shop": 100.0}, None, clock=lambda: now[0],
                         campaign_rates=RateCache(spool).get)
    assert paces.paced("shop", "spring") and not paces.paced("free", "spring")
    waits = [asyncio.run(paces.reserve("shop", "spring")) for _ in range(3)]
    assert waits == [0.0, 0.5, 1.0]  # the campaign's 2/s, slower than the account's 100/s
    assert asyncio.run(paces.reserve("shop", "autumn")) == pytest.approx(0.03)  # 100/s
    spool.close()


def test_campaign_rate_through_the_api(tmp_path, dns_server, asyncio_sink_factory) -> None:
    from tests.helpers.http import call, start_http_engine

    sink = asyncio_sink_factory(host="127.0.0.2", record=True)
    dns_server.add_mx("camp.test", [(10, "mx.camp.test")])
    dns_server.add_a("mx.camp.test", "127.0.0.2")
    engine = start_http_engine(
        tmp_path, dns={"nameservers": [dns_server.address], "timeout": 5.0},
        delivery={"enabled": True, "port": sink.port, "allow_loopback_mx": True})
    try:
        url = engine.url + "/api/v1/campaigns/default/slow/rate"
        status, body, _ = call(url, "POST", body={"max_rate": "fast"})
        assert status == 400 and "rate" in body["error"]
        status, body, _ = call(url, "POST", body={"max_rate": "5/s"})
        assert status == 200 and body["per_second"] == 5.0
        with smtplib.SMTP(engine.host, engine.port) as client:
            for n in range(10):
                client.sendmail("s@shop.test", [f"u{n}@camp.test"],
                                f"From: s@shop.test\r\nX-Campaign-ID: slow\r\n"
                                f"Subject: {n}\r\n\r\nx\r\n")
        assert sink.wait_for(messages=10, timeout=30)
    finally:
        engine.stop()
    times = sorted(m.received_at for m in sink.received)
    assert 1.5 <= times[-1] - times[0] < 10  # 10 messages at 5/s: about 1.8 s
    actions = [r.get("action") for r in read_audit(tmp_path / "audit.jsonl")]
    assert "campaign.rate" in actions


def test_the_account_queue_wait_is_visible(tmp_path, dns_server, asyncio_sink_factory) -> None:
    """The wait of a paced account: its gauge and histogram in /metrics, `queue_wait` in
    the account's API row (and `mta account show`), the dashboard's account_waits."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.helpers.engine import wait_until
    from tests.helpers.http import TOKEN, call, start_http_engine

    sink = asyncio_sink_factory(host="127.0.0.2", record=True)
    dns_server.add_mx("wait.test", [(10, "mx.wait.test")])
    dns_server.add_a("mx.wait.test", "127.0.0.2")
    engine = start_http_engine(
        tmp_path, dns={"nameservers": [dns_server.address], "timeout": 5.0},
        delivery={"enabled": True, "port": sink.port, "allow_loopback_mx": True},
        smtp={"trusted_account": "shop"},
        accounts=[{"name": "shop", "max_rate": "2/s"}])
    try:
        with smtplib.SMTP(engine.host, engine.port) as client:
            for n in range(20):  # 10 s of mail at 2/s
                client.sendmail("s@shop.test", [f"u{n}@wait.test"],
                                f"From: s@shop.test\r\nSubject: {n}\r\n\r\nx\r\n")

        def row() -> dict:
            return call(engine.url + "/api/v1/accounts/shop")[1]

        assert wait_until(lambda: row().get("queue_wait", 0) > 2.0, timeout=30), row()
        [listed] = [r for r in call(engine.url + "/api/v1/accounts")[1] if r["name"] == "shop"]
        assert listed["queue_wait"] > 0
        dashboard = call(engine.url + "/api/v1/dashboard")[1]
        assert dashboard["account_waits"].get("shop", 0) > 0
        text = call(engine.url + "/metrics", token=None)[1]
        gauge = [line for line in text.splitlines()
                 if line.startswith('mta_account_queue_wait_seconds{account="shop"}')]
        assert gauge and float(gauge[0].split()[-1]) > 0, gauge
        count = [line for line in text.splitlines()
                 if line.startswith('mta_account_pace_wait_seconds_count{account="shop"}')]
        assert count and float(count[0].split()[-1]) >= 5, count
        root = Path(__file__).resolve().parents[1]
        shown = subprocess.run(
            [sys.executable, "-m", "mta", "account", "show", "shop", "--url", engine.url,
             "--token", TOKEN, "--json"], capture_output=True, text=True, cwd=root, timeout=60,
            env=dict(os.environ, PYTHONPATH=str(root)))
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["queue_wait"] >= 0
        assert sink.wait_for(messages=20, timeout=60)
        assert wait_until(lambda: row().get("queue_wait") == 0.0, timeout=30), row()
    finally:
        engine.stop()
