"""The inbound path: VERP return paths out, bounces and complaints back in, attributed."""

from __future__ import annotations

import smtplib
from pathlib import Path

from mta.bounce.verp import parse_return_path
from mta.queue.spool import Spool, domain_hash
from tests.helpers.engine import start_engine, wait_until
from tests.helpers.reports import arf, dsn
from tests.test_delivery import events

BOUNCE_DOMAIN = "bounces.shop.test"
SECRET = "test-verp-secret"


def engine_with_sink(tmp: Path, dns, sink, secret: str = SECRET, workers: int | None = None):
    dns.add_mx("dest.test", [(10, "mx.dest.test")])
    dns.add_a("mx.dest.test", "127.0.0.2")
    return start_engine(
        tmp, workers, dns={"nameservers": [dns.address], "timeout": 5.0},
        delivery={"enabled": True, "port": sink.port, "allow_loopback_mx": True},
        bounce={"domain": BOUNCE_DOMAIN, "verp_secret": secret,
                "unparsed_dir": str(tmp / "unparsed")})


def test_bounce_and_complaint_come_back_attributed(tmp_path, dns_server,
                                                   asyncio_sink_factory) -> None:
    sink = asyncio_sink_factory(host="127.0.0.2", record=True)
    engine = engine_with_sink(tmp_path, dns_server, sink)
    try:
        with smtplib.SMTP(engine.host, engine.port) as client:
            client.sendmail("news@shop.test", ["gone@dest.test"],
                            b"From: news@shop.test\r\nTo: gone@dest.test\r\nSubject: spring\r\n"
                            b"X-Campaign-ID: spring\r\nMessage-ID: <m1@shop.test>\r\n\r\nhi\r\n")
        assert wait_until(lambda: sink.accepted == 1, timeout=15)
        verp = sink.received[0].mail_from
        original_id = events(tmp_path, "Reception")[0]["id"]
        assert verp.endswith("@" + BOUNCE_DOMAIN)
        assert parse_return_path(SECRET.encode(), verp) == (original_id, "gone@dest.test")
        # The remote MX bounces later, from an address that is not trusted: no AUTH needed
        # for the bounce domain, and the report names no campaign: VERP attributes it.
        # The complaint quotes the original's return path; one that quotes none proves
        # nothing and is only shown.
        with smtplib.SMTP(engine.host, engine.port, source_address=("127.0.0.3", 0)) as remote:
            remote.sendmail("", [verp], dsn(verp, ["gone@dest.test"]))
            fbl = f"fbl@{BOUNCE_DOMAIN}"
            remote.sendmail("fbl@isp.test", [fbl], arf(fbl, ["angry@dest.test"],
                                                       f"Return-Path: <{verp}>\n"))
            remote.sendmail("fbl@isp.test", [fbl], arf(fbl, ["angry@dest.test"]))
            remote.sendmail("x@isp.test", [f"postmaster@{BOUNCE_DOMAIN}"],
                            b"Subject: hello\r\n\r\njust chatting\r\n")
        assert wait_until(lambda: events(tmp_path, "Bounce") and events(tmp_path, "Complaint")
                          and events(tmp_path, "UnverifiedFeedback")
                          and events(tmp_path, "Unparsed"), timeout=15)
    finally:
        engine.stop()
    bounce = events(tmp_path, "Bounce")[0]
    assert (bounce["source"], bounce["kind"], bounce["reason"], bounce["status"]) == (
        "async", "hard", "userunknown", "5.1.1")
    assert (bounce["id"], bounce["recipient"], bounce["campaign"], bounce["account"]) == (
        original_id, "gone@dest.test", "spring", "default")
    [complaint] = events(tmp_path, "Complaint")
    # The token binds the recipient: the report's own Original-Rcpt-To cannot widen it.
    assert (complaint["recipient"], complaint["campaign"], complaint["feedback_type"]) == (
        "gone@dest.test", "spring", "abuse")
    [unverified] = events(tmp_path, "UnverifiedFeedback")
    assert unverified["claimed"] == ["angry@dest.test"] and "source" not in unverified
    assert len(list((tmp_path / "unparsed").glob("*.eml"))) == 1
    # None of the inbound mail was relayed anywhere.
    assert sink.accepted == 1


def test_without_a_verp_secret_each_spool_makes_its_own_and_keeps_it(
        tmp_path, dns_server, asyncio_sink_factory) -> None:
    sink = asyncio_sink_factory(host="127.0.0.2", record=True)
    # one domain for each of the two workers' deliverers
    domains = [next(f"w{w}-{n}.test" for n in range(100) if domain_hash(f"w{w}-{n}.test") % 2 == w)
               for w in (0, 1)]
    for domain in domains:
        dns_server.add_mx(domain, [(10, "mx.dest.test")])
    for run in range(2):  # the key outlives a restart: old bounces still verify
        engine = engine_with_sink(tmp_path, dns_server, sink, secret="", workers=2)
        try:
            with smtplib.SMTP(engine.host, engine.port) as client:
                for i in range(4):
                    client.sendmail("news@shop.test", [f"u{run}{i}@{domains[i % 2]}"],
                                    b"From: news@shop.test\r\nSubject: s\r\n\r\nhi\r\n")
            # stop only once the engine has recorded every delivery (a delivery not yet
            # recorded at the stop would go out again after the restart)
            assert wait_until(lambda n=4 * (run + 1): len(events(tmp_path, "Delivery")) == n,
                              timeout=15)
        finally:
            engine.stop()
    spool = Spool(tmp_path / "spool")
    try:
        key = spool.secret("verp")
    finally:
        spool.close()
    assert len(key) == 32 and key != b"change-me-verp-secret"
    ids = {e["id"]: e["recipient"] for e in events(tmp_path, "Delivery")}
    assert len(ids) == 8 and {e["worker"] for e in events(tmp_path, "Delivery")} == {0, 1}
    verified = {parse_return_path(key, m.mail_from) for m in sink.received}
    assert verified == set(ids.items())
    other = Spool(tmp_path / "other")
    try:
        assert other.secret("verp") != key
    finally:
        other.close()
