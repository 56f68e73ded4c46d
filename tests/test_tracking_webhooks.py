"""Open and Click events reach the webhooks (the event outbox, mta/outbox).

A real engine with tracking and one webhook for Open and Click, a DNS server and a sink
MX on loopback, and the loopback webhook receiver that checks every signature
(bench/rig/webhook.py): a person's open and click on the public endpoints arrive at the
receiver, signed, valid against config/event-schema.json, with the fields the event log
has (class, rule, link); a forged token gives no event. Each is appended to the outbox in
the transaction that counts it (the tracker with a stand-in for the outbox's append).
"""

from __future__ import annotations

import json
import re
import smtplib
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from bench.engine_proc import PROJECT_ROOT, EngineProcess, read_events
from bench.rig.webhook import WebhookReceiver
from tests.helpers.engine import engine_config, wait_until
from tests.test_tracking import BROWSER, LINKS, bodies, fetch, newsletter

SECRET = "s3cret-for-the-tracking-webhook"
SCHEMA = json.loads((PROJECT_ROOT / "config" / "event-schema.json").read_text())


def start(tmp: Path, dns: Any, sink_port: int, receiver: WebhookReceiver) -> EngineProcess:
    dns.add_mx("dest.test", [(10, "mx.dest.test")])
    dns.add_a("mx.dest.test", "127.0.0.2")
    config = engine_config(
        tmp, dns={"nameservers": [dns.address], "timeout": 5.0},
        delivery={"enabled": True, "port": sink_port, "allow_loopback_mx": True},
        smtp={"trusted_account": "shop"}, tracking={"scanner_window": 1.0},
        accounts=[{"name": "shop", "email": "ops@shop.test"}],
        webhooks=[{"name": "engagement", "url": receiver.url, "secret": SECRET,
                   "events": ["Open", "Click"], "batch_wait": 0.2, "timeout": 2.0}],
        outbox={"retry_initial": 0.2, "retry_max": 1.0})
    config["http"]["public_url"] = f"http://{config['http']['listen']}"
    return EngineProcess(tmp, config, workers=1).start()


def test_an_open_and_a_click_arrive_at_the_webhook(tmp_path: Path, dns_server: Any,
                                                   asyncio_sink_factory: Any) -> None:
    sink = asyncio_sink_factory(host="127.0.0.2", record=True)
    with WebhookReceiver(SECRET.encode()) as receiver:
        engine = start(tmp_path, dns_server, sink.port, receiver)
        try:
            with smtplib.SMTP(engine.host, engine.port, timeout=30) as client:
                client.sendmail("news@shop.test", ["ann@dest.test"], newsletter("ann@dest.test"))
            assert wait_until(lambda: sink.accepted == 1, timeout=20)
            html = bodies(sink.received[0].data)[1]
            link = re.findall(r'href="(http://[^"]+/c/[^"]+)"', html)[1]
            pixel = re.search(r'<img src="([^"]+)"', html).group(1)
            assert fetch(pixel)[0] == 200
            assert fetch(link)[0] == 302
            assert fetch(link[:-3] + "AAA")[0] == 404  # forged: no event

            def arrived() -> list[dict[str, Any]]:
                return [e for e in receiver.events() if e["type"] in ("Open", "Click")]

            assert wait_until(lambda: {e["type"] for e in arrived()} == {"Open", "Click"},
                              timeout=30), receiver.events()
        finally:
            engine.stop()
    events = {e["id"]: e for e in arrived()}.values()  # a retry may send one twice
    assert sorted(e["type"] for e in events) == ["Click", "Open"]
    assert all(r.verified for r in receiver.received)
    for event in events:
        jsonschema.validate(event, SCHEMA)
        assert (event["account"], event["campaign"], event["recipient"]) == (
            "shop", "spring", "ann@dest.test")
        assert (event["class"], event["rule"], event["user_agent"]) == ("human", "browser",
                                                                         BROWSER)
    click = next(e for e in events if e["type"] == "Click")
    assert click["link"] == LINKS[1]
    logged = {e["type"]: e for e in read_events(tmp_path / "events.jsonl") if e["type"] in (
        "Open", "Click")}
    # The event log has them too, with the outbox's id: appended in the transaction that
    # counted them (path 1), before the log line was written.
    assert {kind: e.get("event_id") for kind, e in logged.items()} == {
        e["type"]: e["id"] for e in events}


# --- the outbox append and the counts: one transaction ---------------------------------------

@pytest.mark.asyncio
async def test_the_outbox_gets_each_event_in_the_transaction_that_counts_it(
        tmp_path: Path) -> None:
    from mta.config import TrackingConfig
    from mta.queue.commit import GroupCommitter
    from mta.queue.spool import Spool
    from mta.tracking.hits import Tracker
    from mta.tracking.stats import engagement
    from mta.tracking.tokens import CLICK, OPEN, TrackTarget, make_token

    spool = Spool(tmp_path / "spool", 64 * 1024**2)
    committer = GroupCommitter(spool)
    committer.start()
    secret = b"k" * 32
    logged: list[dict[str, Any]] = []
    in_txn: list[tuple[int, int, list[str]]] = []
    failing = [False]

    def record(txn: Any, events: list[dict[str, Any]]) -> None:
        """What the outbox's append sees: the counts of the same transaction."""
        figures = engagement(spool, txn, "shop", "spring", 1)
        in_txn.append((figures["opens_total"], figures["clicks_total"],
                       [e["type"] for e in events]))
        if failing[0]:
            raise OSError("the spool is full")
        for event in events:
            event["event_id"] = f"id-{event['type']}"

    tracker = Tracker(TrackingConfig(scanner_window=0.0), secret, logged.append, spool=spool,
                      submit=committer.submit, record_events=record)

    def token(kind: str, index: int = 0) -> str:
        return make_token(secret, TrackTarget(kind, "shop", "spring", "M1", "ann@dest.test",
                                              0, 2, index, LINKS[index] if kind == CLICK else ""))

    try:
        assert tracker.open(token(OPEN), "GET", BROWSER, "127.0.0.1")
        assert tracker.click(token(CLICK), "GET", BROWSER, "127.0.0.1") == LINKS[0]
        assert logged == []  # not in the event log before it is counted and in the outbox
        await tracker.write()
        assert in_txn == [(1, 1, ["Open", "Click"])]
        assert [(e["type"], e["event_id"]) for e in logged] == [("Open", "id-Open"),
                                                                ("Click", "id-Click")]
        failing[0] = True  # the append fails: the counts are not written either
        assert tracker.open(token(OPEN), "GET", BROWSER, "127.0.0.1")
        with pytest.raises(OSError):
            await tracker.write()
        assert logged[-1]["type"] == "Open" and "event_id" not in logged[-1]  # for path 2
        with spool.read() as txn:
            assert engagement(spool, txn, "shop", "spring", 1)["opens_total"] == 1
    finally:
        await committer.close()
        spool.close()
