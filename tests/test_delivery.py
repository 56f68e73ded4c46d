"""Outbound delivery end to end: a real engine, a real DNS server and real sinks on loopback."""

from __future__ import annotations

import email
import smtplib
from pathlib import Path
from typing import Any

import pytest

from bench.engine_proc import read_events
from bench.rig.sinks import SinkFaults
from tests.helpers.engine import start_engine, wait_until

SENDER = "news@shop.test"


def message(to: str, subject: str = "hello") -> bytes:
    return (f"From: <{SENDER}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@shop.test>\r\n\r\nbody\r\n").encode()


def delivering(tmp: Path, dns: Any, port: int, **delivery: Any):
    settings = {"enabled": True, "port": port, "allow_loopback_mx": True,
                "retry_initial": 1.0, "retry_max": 2.0, "retry_jitter": 0.0,
                "connection_idle_timeout": 1.0, "connect_timeout": 2.0,
                "command_timeout": 3.0, **delivery}
    return start_engine(tmp, dns={"nameservers": [dns.address], "timeout": 5.0},
                        delivery=settings)


def events(tmp: Path, kind: str | None = None) -> list[dict[str, Any]]:
    return read_events(tmp / "events.jsonl", kind)


def submit(engine: Any, recipients: list[str], subject: str = "hello",
           sender: str = SENDER) -> None:
    with smtplib.SMTP(engine.host, engine.port) as client:
        client.sendmail(sender, recipients, message(recipients[0], subject))


@pytest.fixture
def shop_sink(dns_server, asyncio_sink_factory):
    """A factory: the sender's own domain routes to a recording sink, to read DSNs there.

    Delivery uses one port for every MX, so the sink takes the port it is given.
    """
    dns_server.add_mx("shop.test", [(10, "mx.shop.test")])
    dns_server.add_a("mx.shop.test", "127.0.0.9")
    return lambda port=0: asyncio_sink_factory(host="127.0.0.9", port=port, record=True)


def test_delivers_and_reuses_connections(tmp_path, dns_server, smtp_sink_factory) -> None:
    sink = smtp_sink_factory(host="127.0.0.2")
    for d in ("a.test", "b.test", "c.test"):
        dns_server.add_mx(d, [(10, "mx.hosting.test")])
    dns_server.add_a("mx.hosting.test", "127.0.0.2")
    engine = delivering(tmp_path, dns_server, sink.port, max_connections_per_destination=2)
    try:
        with smtplib.SMTP(engine.host, engine.port) as client:
            for i in range(30):
                rcpt = f"user{i}@{'abc'[i % 3]}.test"
                client.sendmail(SENDER, [rcpt], message(rcpt, f"m{i}"))
        assert wait_until(lambda: len(events(tmp_path, "Delivery")) == 30, timeout=20)
    finally:
        engine.stop()
    assert sink.wait_for(messages=30, timeout=5)
    # Three domains on one MX share a pool of at most two connections.
    assert 1 <= sink.sessions <= 2
    assert {e["mx"] for e in events(tmp_path, "Delivery")} == {"mx.hosting.test"}


def test_mx_fallback_to_the_next_preference(tmp_path, dns_server, asyncio_sink_factory) -> None:
    sink = asyncio_sink_factory(host="127.0.0.3")
    dns_server.add_mx("fallback.test", [(10, "down.fallback.test"), (20, "up.fallback.test")])
    dns_server.add_a("down.fallback.test", "127.0.0.4")  # nothing listens there
    dns_server.add_a("up.fallback.test", "127.0.0.3")
    engine = delivering(tmp_path, dns_server, sink.port)
    try:
        submit(engine, ["x@fallback.test"])
        assert wait_until(lambda: events(tmp_path, "Delivery"), timeout=15)
    finally:
        engine.stop()
    assert events(tmp_path, "Delivery")[0]["mx"] == "up.fallback.test"
    assert sink.accepted == 1


def dsn_parts(data: bytes) -> tuple[email.message.Message, list[email.message.Message]]:
    report = email.message_from_bytes(data)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    return report, list(report.walk())


def test_null_mx_bounces_at_once_with_a_dsn(tmp_path, dns_server, shop_sink) -> None:
    shop_sink = shop_sink()
    dns_server.add_mx("nullmx.test", [(0, ".")])
    engine = delivering(tmp_path, dns_server, shop_sink.port)
    try:
        submit(engine, ["x@nullmx.test"], "nullmx")
        assert wait_until(lambda: shop_sink.accepted >= 1, timeout=15)
    finally:
        engine.stop()
    bounce = events(tmp_path, "Bounce")
    assert [(b["recipient"], b["status"], b["code"]) for b in bounce] == [
        ("x@nullmx.test", "5.1.10", 556)]
    dsn = shop_sink.received[0]
    assert dsn.mail_from == "" and dsn.rcpt_tos == (SENDER,)
    report, parts = dsn_parts(dsn.data)
    status = next(p for p in parts if p.get_content_type() == "message/delivery-status")
    fields = status.get_payload()[1]
    assert fields["Final-Recipient"] == "rfc822; x@nullmx.test"
    assert fields["Action"] == "failed" and fields["Status"] == "5.1.10"
    headers = next(p for p in parts if p.get_content_type() == "text/rfc822-headers")
    assert b"Subject: nullmx" in headers.get_payload(decode=True)
    assert shop_sink.sessions == 1  # the DSN's; nothing connected for nullmx.test


def test_nxdomain_bounces_servfail_defers_then_recovers(tmp_path, dns_server,
                                                        asyncio_sink_factory) -> None:
    sink = asyncio_sink_factory(host="127.0.0.2")
    dns_server.add_zone("flaky.test")
    dns_server.add_mx("flaky.test", [(10, "mx.flaky.test")])
    dns_server.add_a("mx.flaky.test", "127.0.0.2")
    dns_server.fail("flaky.test", "servfail")
    engine = delivering(tmp_path, dns_server, sink.port)
    try:
        submit(engine, ["x@no-such-domain.test"], sender="")
        submit(engine, ["y@flaky.test"])
        assert wait_until(lambda: events(tmp_path, "TransientFailure"), timeout=15)
        dns_server.fail("flaky.test", None)
        assert wait_until(lambda: events(tmp_path, "Delivery"), timeout=20)
    finally:
        engine.stop()
    bounces = events(tmp_path, "Bounce")
    assert [(b["recipient"], b["status"]) for b in bounces] == [("x@no-such-domain.test", "5.1.2")]
    deferred = events(tmp_path, "TransientFailure")
    assert {(d["recipient"], d["status"]) for d in deferred} == {("y@flaky.test", "4.4.3")}
    assert events(tmp_path, "Delivery")[0]["recipient"] == "y@flaky.test"


def test_per_recipient_results_in_one_transaction(tmp_path, dns_server,
                                                  asyncio_sink_factory) -> None:
    faults = SinkFaults(rcpt_rules=[("bad", "550 5.1.1 no such user"),
                                    ("later", "450 4.2.1 mailbox busy")])
    sink = asyncio_sink_factory(host="127.0.0.2", faults=faults, record=True)
    dns_server.add_mx("mixed.test", [(10, "mx.mixed.test")])
    dns_server.add_a("mx.mixed.test", "127.0.0.2")
    engine = delivering(tmp_path, dns_server, sink.port, retry_initial=60.0)
    try:
        submit(engine, ["good@mixed.test", "bad@mixed.test", "later@mixed.test"])
        assert wait_until(lambda: len(events(tmp_path)) >= 4, timeout=15)
    finally:
        engine.stop()
    assert [m.rcpt_tos for m in sink.received] == [("good@mixed.test",)]
    original = events(tmp_path, "Reception")[0]["id"]
    by_type = {(e["type"], e["recipient"], e["status"]) for e in events(tmp_path)
               if e["type"] != "Reception" and e["id"] == original}
    assert by_type == {("Delivery", "good@mixed.test", "2.0.0"),
                       ("Bounce", "bad@mixed.test", "5.1.1"),
                       ("TransientFailure", "later@mixed.test", "4.2.1")}


def test_retry_then_success_and_drop_after_dot_is_not_lost(tmp_path, dns_server,
                                                           asyncio_sink_factory) -> None:
    faults = SinkFaults(drop_after_dot=True)
    sink = asyncio_sink_factory(host="127.0.0.2", faults=faults)
    dns_server.add_mx("retry.test", [(10, "mx.retry.test")])
    dns_server.add_a("mx.retry.test", "127.0.0.2")
    engine = delivering(tmp_path, dns_server, sink.port)
    try:
        submit(engine, ["x@retry.test"])
        assert wait_until(lambda: events(tmp_path, "TransientFailure"), timeout=15)
        faults.drop_after_dot = False
        assert wait_until(lambda: events(tmp_path, "Delivery"), timeout=15)
    finally:
        engine.stop()
    first = events(tmp_path, "TransientFailure")[0]
    assert first.get("possible_duplicate") is True and first["status"].startswith("4.")
    assert not events(tmp_path, "Bounce")
    assert events(tmp_path, "Delivery")[0]["attempt"] >= 2


def test_expiry_sends_a_dsn(tmp_path, dns_server, shop_sink, asyncio_sink_factory) -> None:
    sink = asyncio_sink_factory(host="127.0.0.2",
                                faults=SinkFaults(mail_reply="451 4.3.0 try again later"))
    shop_sink = shop_sink(sink.port)
    dns_server.add_mx("slow.test", [(10, "mx.slow.test")])
    dns_server.add_a("mx.slow.test", "127.0.0.2")
    engine = delivering(tmp_path, dns_server, sink.port, max_age=2.0, retry_initial=0.5,
                        retry_max=0.5)
    try:
        submit(engine, ["x@slow.test"], "expiring")
        assert wait_until(lambda: shop_sink.accepted >= 1, timeout=20)
    finally:
        engine.stop()
    assert [e["recipient"] for e in events(tmp_path, "Expiration")] == ["x@slow.test"]
    assert not events(tmp_path, "Bounce")
    _, parts = dsn_parts(shop_sink.received[0].data)
    status = next(p for p in parts if p.get_content_type() == "message/delivery-status")
    fields = status.get_payload()[1]
    assert fields["Action"] == "failed" and fields["Status"] == "4.3.0"


def test_loopback_mx_is_a_loop_unless_allowed(tmp_path, dns_server) -> None:
    dns_server.add_mx("loop.test", [(10, "mx.loop.test")])
    dns_server.add_a("mx.loop.test", "127.0.0.1")
    engine = delivering(tmp_path, dns_server, 2525, allow_loopback_mx=False)
    try:
        submit(engine, ["x@loop.test"], sender="")
        assert wait_until(lambda: events(tmp_path, "Bounce"), timeout=15)
    finally:
        engine.stop()
    bounce = events(tmp_path, "Bounce")[0]
    assert bounce["status"] == "5.4.6" and "loops back" in bounce["reply"]


def test_smtp_sink_421_on_connect_defers_never_bounces(tmp_path, dns_server,
                                                       smtp_sink_factory) -> None:
    sink = smtp_sink_factory(host="127.0.0.2", close_421=["connect"])
    dns_server.add_mx("busy.test", [(10, "mx.busy.test")])
    dns_server.add_a("mx.busy.test", "127.0.0.2")
    engine = delivering(tmp_path, dns_server, sink.port, retry_initial=60.0)
    try:
        submit(engine, ["x@busy.test"])
        assert wait_until(lambda: events(tmp_path, "TransientFailure"), timeout=15)
    finally:
        engine.stop()
    deferred = events(tmp_path, "TransientFailure")[0]
    assert deferred["code"] == 421 and not events(tmp_path, "Bounce")


def test_full_spool_refuses_then_resumes_when_delivery_frees_space(
        tmp_path, dns_server, asyncio_sink_factory) -> None:
    faults = SinkFaults(mail_reply="451 4.3.0 not now")
    sink = asyncio_sink_factory(host="127.0.0.2", faults=faults)
    dns_server.add_mx("full.test", [(10, "mx.full.test")])
    dns_server.add_a("mx.full.test", "127.0.0.2")
    engine = start_engine(
        tmp_path, dns={"nameservers": [dns_server.address], "timeout": 5.0},
        spool={"map_size": 2 * 1024 * 1024, "max_map_use": 0.8},
        delivery={"enabled": True, "port": sink.port, "allow_loopback_mx": True,
                  "retry_initial": 0.5, "retry_max": 0.5, "retry_jitter": 0.0})
    body = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 20
    try:
        refused, accepted = None, 0
        with smtplib.SMTP(engine.host, engine.port) as client:
            for i in range(200):
                try:
                    client.sendmail(SENDER, [f"u{i}@full.test"], body)
                except (smtplib.SMTPSenderRefused, smtplib.SMTPDataError) as exc:
                    refused = exc
                    break
                accepted += 1
        assert refused is not None and refused.smtp_code == 452
        assert b"4.3.1" in refused.smtp_error
        assert wait_until(lambda: len(events(tmp_path, "Reception")) == accepted, timeout=10)
        faults.mail_reply = ""  # the remote takes mail again: the queue drains
        assert wait_until(lambda: len(events(tmp_path, "Delivery")) == accepted, timeout=30)

        def intake_resumed() -> bool:
            try:
                submit(engine, ["after@full.test"], "after")
                return True
            except smtplib.SMTPException:
                return False

        assert wait_until(intake_resumed, timeout=10, interval=0.5)
    finally:
        engine.stop()
    assert not events(tmp_path, "Bounce")
