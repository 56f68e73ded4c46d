"""Webhooks end to end: a real engine (tests/helpers/engine.py), a DNS server and a sink MX
on loopback, and a loopback webhook receiver that checks every signature
(bench/rig/webhook.py). The outbox's pure parts are tested in tests/test_outbox.py."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from bench.engine_proc import PROJECT_ROOT, EngineProcess, read_events
from bench.load import Submission, make_body, run_load
from bench.net import free_port
from bench.rig.sinks import SinkFaults
from bench.rig.webhook import WebhookReceiver
from mta.outbox import store
from mta.outbox.signing import signature_header, verify
from mta.queue.spool import Spool
from tests.helpers.engine import engine_config, wait_until

SENDER = "news@shop.test"
SECRET = "s3cret-for-the-webhook-tests"
SCHEMA = json.loads((PROJECT_ROOT / "config" / "event-schema.json").read_text())
TOKEN = "test-admin-token-0123456789"
REFUSED = [f"r{i}@dest.test" for i in range(0, 100, 10)]  # 10 of 100


def hook(name: str, url: str, **options: Any) -> dict[str, Any]:
    return {"name": name, "url": url, "secret": SECRET, "batch_wait": 0.2, "timeout": 2.0,
            **options}


def engine_with(tmp: Path, dns: Any, port: int, webhooks: list[dict[str, Any]],
                policy: dict[str, Any] | None = None, **sections: Any) -> dict[str, Any]:
    return engine_config(
        tmp, dns={"nameservers": [dns.address], "timeout": 5.0},
        delivery={"enabled": True, "port": port, "allow_loopback_mx": True,
                  "retry_initial": 1.0, "retry_max": 1.0, "retry_jitter": 0.0,
                  "connect_timeout": 2.0, "command_timeout": 5.0},
        smtp={"trusted_account": "shop"}, policy=policy or {"enabled": False},
        accounts=[{"name": "shop", "email": "ops@shop.test"}],
        webhooks=webhooks, outbox={"retry_initial": 0.2, "retry_max": 1.0}, **sections)


@pytest.fixture
def dest(dns_server, asyncio_sink_factory):
    """dest.test's MX: a recording sink that refuses REFUSED with 550 5.1.1."""
    faults = SinkFaults(rcpt_rules=[(f"^{r}$", "550 5.1.1 no such user") for r in REFUSED])
    sink = asyncio_sink_factory(host="127.0.0.2", faults=faults, record=True)
    dns_server.add_mx("dest.test", [(10, "mx.dest.test")])
    dns_server.add_a("mx.dest.test", "127.0.0.2")
    return sink


@pytest.fixture
def receiver():
    with WebhookReceiver(SECRET.encode()) as server:
        yield server


def submit(engine: EngineProcess, rcpts: list[str], campaign: str = "spring") -> None:
    def make(i: int) -> Submission:
        return Submission(SENDER, [rcpts[i]], make_body(600, f"{campaign} {i}", SENDER,
                                                        rcpts[i], campaign))

    result = asyncio.run(run_load(engine.host, engine.port, make, len(rcpts), sessions=8))
    assert result.accepted == len(rcpts), result.replies


def recipients(n: int = 100) -> list[str]:
    return [f"r{i}@dest.test" for i in range(n)]


def by_type(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == kind]


def unique(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return list({e["id"]: e for e in events}.values())


def of_campaign(receiver: WebhookReceiver, campaign: str = "spring") -> list[dict[str, Any]]:
    """The campaign's events received, once each (not the DSNs the bounces cause)."""
    return [e for e in unique(receiver.events()) if e.get("campaign") == campaign]


def assert_valid(events: list[dict[str, Any]]) -> None:
    for event in events:
        jsonschema.validate(event, SCHEMA)


def mta(engine: EngineProcess, *args: str) -> Any:
    run = subprocess.run([sys.executable, "-m", "mta", *args, "--json", "--config",
                          str(engine.config_path)], capture_output=True, text=True, timeout=60,
                         cwd=PROJECT_ROOT, check=True)
    return json.loads(run.stdout)


def outbox_figures(tmp: Path) -> store.OutboxFigures:
    spool = Spool(tmp / "spool", readonly=True)
    try:
        with spool.read() as txn:
            return store.figures(spool, txn, time.time())
    finally:
        spool.close()


def test_bounces_and_deliveries_arrive_signed_filtered_and_in_small_batches(
        tmp_path, dns_server, dest, receiver) -> None:
    bounces = WebhookReceiver(SECRET.encode()).start()
    nobody = WebhookReceiver(SECRET.encode()).start()
    try:
        config = engine_with(tmp_path, dns_server, dest.port, [
            hook("app", receiver.url, events=["Delivery", "Bounce"], batch_size=7),
            hook("bounces", bounces.url, events=["Bounce"], accounts=["shop"]),
            hook("nobody", nobody.url, accounts=["nobody"])])
        with EngineProcess(tmp_path, config, workers=2) as engine:
            submit(engine, recipients())
            assert wait_until(lambda: len(of_campaign(receiver)) >= 100, timeout=60), \
                len(of_campaign(receiver))
            assert wait_until(lambda: len(of_campaign(bounces)) >= 10, timeout=30)
            # every sink has passed every event: "nobody" was offered all and took none
            assert wait_until(lambda: all(row["pending"] == 0
                                          for row in mta(engine, "webhook", "status")),
                              timeout=30)
        events = of_campaign(receiver)
        bounced = by_type(events, "Bounce")
        assert sorted(e["recipient"] for e in bounced) == sorted(REFUSED)
        assert {(e["account"], e["campaign"], e["status"]) for e in bounced} == {
            ("shop", "spring", "5.1.1")}
        delivered = by_type(events, "Delivery")
        assert len(delivered) == 90 and len(events) == 100
        assert {e["recipient"] for e in delivered} == set(recipients()) - set(REFUSED)
        assert all(e["schema"] == 1 and e["message_id"] for e in events)
        assert all(r.verified for r in receiver.received)
        assert max(len(r.events) for r in receiver.received) <= 7
        assert len(receiver.received) >= 100 // 7
        only_bounces = of_campaign(bounces)
        assert sorted(e["recipient"] for e in only_bounces) == sorted(REFUSED)
        assert {e["type"] for e in only_bounces} == {"Bounce"}
        assert nobody.received == []
        assert_valid(unique(receiver.events()) + unique(bounces.events()))
        # The receiver's check rejects a forgery and a body changed after signing.
        sample = next(r for r in receiver.received if b"5.1.1" in r.body)  # a bounce in it
        now = time.time()
        assert verify(SECRET.encode(), sample.signature, sample.body, now)
        assert not verify(SECRET.encode(), sample.signature, sample.body.replace(b"5.1.1",
                                                                                  b"2.0.0"), now)
        assert not verify(SECRET.encode(), sample.signature + "0", sample.body, now)
        forged = signature_header(b"not-the-secret", int(now), sample.body)
        assert not verify(SECRET.encode(), forged, sample.body, now)
        # The event log carries the same ids (the receiver can match them).
        logged = {e["event_id"] for e in read_events(tmp_path / "events.jsonl")
                  if e.get("type") in ("Delivery", "Bounce")}
        assert logged == receiver.unique_ids()
        assert SECRET not in (tmp_path / "engine.log").read_text()
    finally:
        bounces.stop()
        nobody.stop()


def test_500_500_200_sends_the_same_ids_again_and_loses_none(tmp_path, dns_server, dest,
                                                             receiver) -> None:
    receiver.script = [500, 500]
    config = engine_with(tmp_path, dns_server, dest.port,
                         [hook("app", receiver.url, events=["Delivery", "Bounce"],
                               batch_size=500, batch_wait=1.0)])
    with EngineProcess(tmp_path, config) as engine:
        submit(engine, recipients())
        assert wait_until(lambda: len(of_campaign(receiver)) >= 100, timeout=60)
        assert wait_until(lambda: mta(engine, "webhook", "status")[0]["pending"] == 0,
                          timeout=30)
    statuses = [r.status for r in receiver.received]
    assert statuses[:3] == [500, 500, 200], statuses
    first, second, third = receiver.received[:3]
    assert first.events == second.events  # the same batch again: same ids, same order
    assert {e["id"] for e in first.events} <= {e["id"] for e in third.events}
    logged = {e["event_id"] for e in read_events(tmp_path / "events.jsonl")
              if e.get("type") in ("Delivery", "Bounce")}
    assert logged == receiver.unique_ids() and len(of_campaign(receiver)) == 100
    assert_valid(receiver.events())


def test_kill_9_while_the_receiver_is_down_loses_no_event(tmp_path, dns_server, dest) -> None:
    port = free_port()
    receiver = WebhookReceiver(SECRET.encode(), port=port)  # not listening yet
    config = engine_with(tmp_path, dns_server, dest.port,
                         [hook("app", receiver.url, events=["Delivery", "Bounce"])])
    engine = EngineProcess(tmp_path, config, workers=2).start()
    try:
        submit(engine, recipients())
        assert wait_until(lambda: dest.accepted >= 90, timeout=60)
        assert wait_until(lambda: outbox_figures(tmp_path).depth >= 100, timeout=30)
    finally:
        engine.kill9()
    receiver.start()
    try:
        with EngineProcess(tmp_path, config, workers=2):
            assert wait_until(lambda: len(of_campaign(receiver)) >= 100, timeout=60)
        events = of_campaign(receiver)
        assert len(by_type(events, "Delivery")) == 90
        assert sorted(e["recipient"] for e in by_type(events, "Bounce")) == sorted(REFUSED)
        assert outbox_figures(tmp_path).depth == 0
    finally:
        receiver.stop()


def test_kill_9_in_the_middle_of_delivery_every_delivered_recipient_is_reported(
        tmp_path, dns_server, asyncio_sink_factory) -> None:
    sink = asyncio_sink_factory(host="127.0.0.2", record=True,
                                faults=SinkFaults(dot_delay=0.02))
    dns_server.add_mx("dest.test", [(10, "mx.dest.test")])
    dns_server.add_a("mx.dest.test", "127.0.0.2")
    port = free_port()
    receiver = WebhookReceiver(SECRET.encode(), port=port)
    config = engine_with(tmp_path, dns_server, sink.port,
                         [hook("app", receiver.url, events=["Delivery"])])
    engine = EngineProcess(tmp_path, config).start()
    rcpts = [f"k{i}@dest.test" for i in range(300)]
    try:
        submit(engine, rcpts)
        assert wait_until(lambda: sink.accepted >= 50, timeout=60)
    finally:
        engine.kill9()  # deliveries in flight, outcomes half recorded
    receiver.start()
    try:
        with EngineProcess(tmp_path, config):
            assert wait_until(lambda: {e["recipient"] for e in receiver.events()}
                              >= set(rcpts), timeout=90)
        at_sink = {r for m in sink.received if m.accepted for r in m.rcpt_tos}
        assert at_sink == set(rcpts)
    finally:
        receiver.stop()


def test_a_hanging_endpoint_does_not_hold_delivery_back(tmp_path, dns_server, dest,
                                                        receiver) -> None:
    receiver.hang = True
    config = engine_with(tmp_path, dns_server, dest.port, [hook("app", receiver.url)])
    config["http"]["admin_token"] = TOKEN  # `mta webhook status` through the API: live state
    with EngineProcess(tmp_path, config) as engine:
        submit(engine, recipients())
        assert wait_until(lambda: len(read_events(tmp_path / "events.jsonl", "Delivery")) == 90
                          and len(read_events(tmp_path / "events.jsonl", "Bounce")) >= 10,
                          timeout=60)
        assert dest.accepted == 90
        assert outbox_figures(tmp_path).depth >= 200  # Reception + outcomes, all waiting
        assert wait_until(lambda: mta(engine, "webhook", "status")[0]["failures"] >= 1,
                          timeout=30)
        status = mta(engine, "webhook", "status")[0]
        assert status["pending"] >= 200 and status["delivered"] == 0
        assert "no answer" in status["last_error"]
        metrics = engine_metrics(engine)
        assert "mta_outbox_events" in metrics and "mta_outbox_oldest_age_seconds" in metrics
    assert not any(r.status < 300 for r in receiver.received)


def one_click(url: str) -> int:
    request = urllib.request.Request(url, data=b"List-Unsubscribe=One-Click", method="POST",
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status


def test_unsubscribes_the_pause_they_cause_and_an_offline_resume_reach_the_app(
        tmp_path, dns_server, route, receiver) -> None:
    dest = route("dest.test", "127.0.0.2")
    route("shop.test", "127.0.0.9")
    config = engine_with(tmp_path, dns_server, dest.port,
                         [hook("app", receiver.url, events=["Unsubscribe", "CampaignPaused",
                                                             "CampaignResumed"])],
                         policy={"flush_interval": 0.05, "min_volume": 100})
    config["http"]["public_url"] = f"http://{config['http']['listen']}"
    with EngineProcess(tmp_path, config) as engine:
        submit(engine, [f"u{i}@dest.test" for i in range(100)])
        assert wait_until(lambda: mta(engine, "campaign", "show", "spring")["delivered"] == 100,
                          timeout=60)
        links = [re.search(rb"List-Unsubscribe: <(http[^>]+)>", m.data).group(1).decode()
                 for m in list(dest.received)[:2]]
        assert [one_click(link) for link in links] == [200, 200]  # 2 %: over 1 %
        assert wait_until(lambda: {e["type"] for e in receiver.events()} == {
            "Unsubscribe", "CampaignPaused"}, timeout=30)
        unsubscribed = by_type(unique(receiver.events()), "Unsubscribe")
        assert sorted(e["recipient"] for e in unsubscribed) == sorted(
            m.rcpt_tos[0] for m in list(dest.received)[:2])
        [paused] = by_type(unique(receiver.events()), "CampaignPaused")
        assert (paused["account"], paused["campaign"], paused["rule"]) == (
            "shop", "spring", "unsubscribe")
    resumed = subprocess.run(
        [sys.executable, "-m", "mta", "campaign", "resume", "spring", "--account", "shop",
         "--offline", "--config", str(engine.config_path)], capture_output=True, text=True,
        timeout=60, cwd=PROJECT_ROOT)
    assert resumed.returncode == 0, resumed.stderr
    with EngineProcess(tmp_path, config):  # the CLI's event waited in the outbox
        assert wait_until(lambda: by_type(receiver.events(), "CampaignResumed"), timeout=30)
    assert_valid(unique(receiver.events()))


def engine_metrics(engine: EngineProcess) -> str:
    listen = engine.config["http"]["listen"]
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=10) as response:
        return response.read().decode()


def test_https_endpoint_is_trusted_through_the_ca_file_and_refused_without_it(tmp_path) -> None:
    import trustme

    from mta.config import WebhookConfig
    from mta.outbox.sink import SinkFailed
    from mta.outbox.webhook import WebhookSink
    from tests.helpers.tls import HttpsServer, write_ca

    ca = trustme.CA()
    server = HttpsServer(ca, ["127.0.0.1"], "127.0.0.1", free_port()).start()
    try:
        url = f"https://127.0.0.1:{server.port}/events"
        trusted = WebhookSink(WebhookConfig("tls", url, SECRET, ca_file=write_ca(ca, tmp_path)))
        untrusted = WebhookSink(WebhookConfig("tls", url, SECRET))  # the system store only
        batch = [{"id": "1", "type": "Delivery"}]

        async def both() -> None:
            try:
                await trusted.deliver(batch)
                with pytest.raises(SinkFailed, match="(?i)certificate"):
                    await untrusted.deliver(batch)
            finally:
                await trusted.close()
                await untrusted.close()

        asyncio.run(both())
        [posted] = server.posts
        assert posted.path == "/events" and json.loads(posted.body) == batch
        assert posted.content_type == "application/json"
    finally:
        server.stop()
