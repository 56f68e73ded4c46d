"""Scheduled sending: X-Send-At / send_at parsed, stored as the jobs' first due time,
kept across holds and crashes; campaign delivery windows. Units without sockets first,
then real engines on loopback."""

from __future__ import annotations

import json
import smtplib
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from bench.engine_proc import EngineProcess
from bench.net import free_port, wait_for_port
from mta.config import Config, ConfigError, build_section
from mta.config import WindowConfig as _WindowConfig
from mta.inject.auth import api_key_hash, new_api_key
from mta.inject.request import BadRequest, Limits, parse_request
from mta.queue import jobs
from mta.queue.outcome import RcptResult
from mta.queue.schedule import Window, Windows, parse_send_at, windows_of
from mta.queue.spool import NewMessage, Spool
from mta.smtp.intake import read_send_at
from mta.wire import without_fields
from tests.helpers.engine import engine_config, wait_until
from tests.helpers.http import call, start_http_engine
from tests.test_delivery import events

KEY = new_api_key()

# --- parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("1765000000", 1765000000.0),
    ("1765000000.25", 1765000000.25),
    ("2026-12-06T09:00:00Z", datetime(2026, 12, 6, 9, tzinfo=UTC).timestamp()),
    ("2026-12-06t09:00:00z", datetime(2026, 12, 6, 9, tzinfo=UTC).timestamp()),
    ("2026-12-06 10:00:00+01:00", datetime(2026, 12, 6, 9, tzinfo=UTC).timestamp()),
    ("2026-12-06T09:00:00.5-00:30", datetime(2026, 12, 6, 9, 30, 0, 500000,
                                             tzinfo=UTC).timestamp()),
    (" 2026-12-06T09:00:00.123456789+00:00 ",
     datetime(2026, 12, 6, 9, 0, 0, 123456, tzinfo=UTC).timestamp()),
])
def test_send_at_parses_rfc3339_and_unix_seconds(text: str, expected: float) -> None:
    assert parse_send_at(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", [
    "", "tomorrow", "2026-12-06T09:00:00", "2026-12-06", "2026-13-06T09:00:00Z",
    "2026-12-06T25:00:00Z", "-5", "1e9", "Sun, 06 Dec 2026 09:00:00 +0000",
    "2026-12-06T09:00:00+0100", "0x10",
])
def test_send_at_refuses_anything_else(text: str) -> None:
    assert parse_send_at(text) is None


def test_header_read_once_and_removed_with_its_folds() -> None:
    headers = b"From: a@b.test\r\nX-Send-At:\r\n 1765000000\r\nSubject: x\r\n"
    assert read_send_at(headers, "X-Send-At") == (1765000000.0, None)
    assert read_send_at(b"From: a@b.test\r\n", "X-Send-At") == (0.0, None)
    when, refusal = read_send_at(b"x-send-at: soon\r\n", "X-Send-At")
    assert when == 0.0 and refusal is not None
    assert refusal.startswith("550 5.6.0 X-Send-At:")
    twice = b"X-Send-At: 1\r\nX-Send-At: 2\r\n"
    assert read_send_at(twice, "X-Send-At")[1].startswith("550 5.6.0 X-Send-At: appears 2")
    content = headers + b"\r\nX-Send-At: in the body stays\r\n"
    assert without_fields(content, "X-Send-At") == (
        b"From: a@b.test\r\nSubject: x\r\n\r\nX-Send-At: in the body stays\r\n")
    assert without_fields(b"X-Send-At: 1\r\nX-Send-Atx: 2\r\n\r\nb", "X-Send-At") == (
        b"X-Send-Atx: 2\r\n\r\nb")


def test_inject_request_send_at() -> None:
    limits = Limits(10, 0)

    def request(**extra: Any) -> bytes:
        return json.dumps({"envelope_sender": "s@shop.test", "recipients": [
            {"email": "a@x.test"}], "content": "Subject: x\r\n\r\nhi", **extra}).encode()

    assert parse_request(request(), limits).send_at is None
    assert parse_request(request(send_at=1765000000), limits).send_at == 1765000000.0
    assert parse_request(request(send_at="2026-12-06T09:00:00Z"), limits).send_at == (
        datetime(2026, 12, 6, 9, tzinfo=UTC).timestamp())
    for bad in ("soon", True, -1, [1]):
        with pytest.raises(BadRequest) as caught:
            parse_request(request(send_at=bad), limits)
        assert caught.value.status == 400 and "send_at" in caught.value.message


# --- the spool -------------------------------------------------------------------------


def test_scheduled_job_is_due_at_its_time_and_a_release_keeps_it(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", map_size=64 * 1024**2)
    now = time.time()
    later = NewMessage("s@shop.test", ["a@x.test"], b"m", account="shop", campaign="c",
                       send_at=now + 3600)
    past = NewMessage("s@shop.test", ["b@x.test"], b"m", send_at=now - 3600)
    spool.apply([spool.store_op(later), spool.store_op(past)])
    with spool.read() as txn:
        assert [job_id for _, _, job_id in spool.due(txn, int(now * 1000) + 1000)] == [
            f"{past.id}.0".encode()]
        [job] = jobs.message_jobs(spool, txn, later.id)
        assert job.next_ms == job.not_before_ms == int((now + 3600) * 1000)
        assert job.first_ms == int(later.received * 1000)
        assert spool.get_message(txn, later.id)["send_at"] == later.send_at
        [old] = jobs.message_jobs(spool, txn, past.id)
        assert old.not_before_ms == 0 and "send_at" not in spool.get_message(txn, past.id)

    def pause_and_resume(txn: Any) -> None:  # a campaign paused and resumed before its time
        [job] = jobs.find_jobs(spool, txn, "shop", "c")
        jobs.hold(spool, txn, [job], "paused:c")
        assert jobs.release_reason(spool, txn, "paused:c", int(now * 1000)) == 1

    spool.apply([pause_and_resume])
    with spool.read() as txn:
        [job] = jobs.message_jobs(spool, txn, later.id)
        assert job.next_ms == int((now + 3600) * 1000) and not job.held
        assert [job_id for _, _, job_id in spool.due(txn, int(now * 1000) + 1000)] == [
            f"{past.id}.0".encode()]
    spool.close()


def test_max_age_counts_from_the_send_time() -> None:
    from mta.queue.outcome import apply_attempt
    from mta.queue.scheduler import _queued_ms

    message = {"received": 1000.0, "send_at": 1000.0 + 86400 * 10}
    assert _queued_ms(message) == int((1000.0 + 86400 * 10) * 1000)
    assert _queued_ms({"received": 1000.0}) == 1_000_000
    job = jobs.new_job(b"m.0", "m", "x.test", "", "", ["a@x.test"], 1_000_000,
                       _queued_ms(message))
    deferred = RcptResult("a@x.test", 451, "later", "4.0.0")
    now_ms = _queued_ms(message) + 1000
    outcome = apply_attempt(job, [deferred], now_ms, _queued_ms(message), 5 * 86400,
                            (60.0, 60.0, 0.0))
    assert outcome.deferred and not outcome.expired


# --- windows ---------------------------------------------------------------------------


def test_window_next_open() -> None:
    paris = Window.of(["mon-fri"], "09:00-17:00", "Europe/Paris")
    # Sunday 6 December 2026, 12:00 UTC: the next window opens Monday 09:00 Paris (08:00Z)
    sunday = datetime(2026, 12, 6, 12, tzinfo=UTC).timestamp()
    assert paris.next_open(sunday) == datetime(2026, 12, 7, 8, tzinfo=UTC).timestamp()
    monday_noon = datetime(2026, 12, 7, 11, tzinfo=UTC).timestamp()
    assert paris.next_open(monday_noon) is None
    friday_evening = datetime(2026, 12, 11, 16, 30, tzinfo=UTC).timestamp()  # 17:30 Paris
    assert paris.next_open(friday_evening) == datetime(2026, 12, 14, 8, tzinfo=UTC).timestamp()
    night = Window.of(["sat"], "22:00-02:00", "UTC")
    assert night.next_open(datetime(2026, 12, 13, 1, tzinfo=UTC).timestamp()) is None  # Sun 1:00
    assert night.next_open(datetime(2026, 12, 13, 3, tzinfo=UTC).timestamp()) == (
        datetime(2026, 12, 19, 22, tzinfo=UTC).timestamp())
    windows = Windows([("", "c", paris), ("vip", "c", Window.of([], "00:00-24:00", "UTC"))])
    assert windows.next_open("shop", "c", sunday) == paris.next_open(sunday)
    assert windows.next_open("vip", "c", sunday) is None
    assert windows.next_open("shop", "other", sunday) is None
    assert windows.next_open("shop", "", sunday) is None


def test_window_config_is_checked() -> None:
    good = build_section(_WindowConfig, {"campaign": "c", "days": ["mon-fri"],
                                         "hours": "09:00-17:00", "timezone": "Europe/Paris"},
                         "[windows]")
    cfg = Config(windows=[good])
    windows = windows_of(cfg)
    assert windows.next_open("a", "c", 0.0) == 8 * 3600.0  # Thu 1970-01-01 01:00 Paris: 09:00
    assert windows.next_open("a", "c", 9 * 3600.0) is None  # 10:00 Paris
    for key, value in (("days", ["someday"]), ("hours", "9-5"), ("hours", "09:00-25:00"),
                       ("timezone", "Mars/Olympus")):
        with pytest.raises(ConfigError, match=key):
            build_section(_WindowConfig, {"campaign": "c", key: value}, "[windows]")


# --- engines on loopback -----------------------------------------------------------------

def _config(tmp: Path, dns: Any, port: int, **sections: Any) -> dict[str, Any]:
    return engine_config(tmp, dns={"nameservers": [dns.address], "timeout": 5.0},
                         delivery={"enabled": True, "port": port, "allow_loopback_mx": True,
                                   "retry_initial": 1.0, "retry_max": 1.0,
                                   "retry_jitter": 0.0},
                         **sections)


def _send(engine: EngineProcess, rcpt: str, send_at: str | None,
          campaign: str = "") -> None:
    headers = f"From: s@shop.test\r\nTo: {rcpt}\r\nSubject: scheduled\r\n"
    if campaign:
        headers += f"X-Campaign-ID: {campaign}\r\n"
    if send_at is not None:
        headers += f"X-Send-At: {send_at}\r\n"
    with smtplib.SMTP(engine.host, engine.port) as client:
        client.sendmail("s@shop.test", [rcpt], headers + "\r\nbody\r\n")


@pytest.fixture
def routed(dns_server, asyncio_sink_factory):
    dns_server.add_mx("sched.test", [(10, "mx.sched.test")])
    dns_server.add_a("mx.sched.test", "127.0.0.2")
    return asyncio_sink_factory(host="127.0.0.2", record=True)


def test_send_at_waits_then_goes_within_a_second_across_kill9(tmp_path, dns_server,
                                                             routed) -> None:
    sink = routed
    config = _config(tmp_path, dns_server, sink.port)
    engine = EngineProcess(tmp_path, config).start()
    send_at = time.time() + 6
    _send(engine, "a@sched.test", f"{send_at:.3f}")
    _send(engine, "now@sched.test", "2001-01-01T00:00:00Z")  # in the past: sends now
    assert wait_until(lambda: events(tmp_path, "Delivery"), timeout=10)  # the one for now
    assert time.time() < send_at, "the machine was too slow to check anything"
    engine.kill9()  # while the scheduled message waits
    with EngineProcess(tmp_path, config):
        assert sink.wait_for(messages=2, timeout=send_at - time.time() + 15)
        assert wait_until(lambda: len(events(tmp_path, "Delivery")) >= 2, timeout=10)
    first, scheduled = list(sink.received)
    assert first.rcpt_tos == ("now@sched.test",) and first.received_at < send_at
    assert scheduled.rcpt_tos == ("a@sched.test",)
    assert send_at <= scheduled.received_at < send_at + 1.5  # 1 s, plus a loaded machine
    for message in (first, scheduled):
        assert b"x-send-at" not in message.data.lower()
    assert sink.messages == 2
    [reception] = [e for e in events(tmp_path, "Reception") if e.get("send_at")]
    assert reception["send_at"] == pytest.approx(send_at)


def test_unparsable_send_at_is_refused_naming_the_header(tmp_path, dns_server,
                                                         routed) -> None:
    with EngineProcess(tmp_path, _config(tmp_path, dns_server, routed.port)) as engine:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            _send(engine, "a@sched.test", "next tuesday")
        assert refused.value.smtp_code == 550
        assert refused.value.smtp_error.startswith(b"5.6.0 X-Send-At:")
    assert routed.messages == 0 and not events(tmp_path, "Reception")


def test_delivery_window_pushes_attempts_to_the_next_window(tmp_path, dns_server,
                                                            routed) -> None:
    now = datetime.now(UTC)
    closed = f"{(now.hour + 2) % 24:02d}:00-{(now.hour + 3) % 24:02d}:00"
    config = _config(tmp_path, dns_server, routed.port, windows=[
        {"campaign": "later", "hours": closed, "timezone": "UTC"}])
    with EngineProcess(tmp_path, config) as engine:
        _send(engine, "w@sched.test", None, campaign="later")
        _send(engine, "x@sched.test", None, campaign="other")
        assert routed.wait_for(messages=1, timeout=10)
        spool = tmp_path / "spool"
        assert wait_until(lambda: _next_due(spool, "w@sched.test") > time.time() + 3000,
                          timeout=10)
    assert [m.rcpt_tos for m in routed.received] == [("x@sched.test",)]


def _next_due(spool_path: Path, rcpt: str) -> float:
    spool = Spool(spool_path, readonly=True)
    try:
        with spool.read() as txn:
            for job in spool.jobs(txn):
                if rcpt in job.waiting():
                    assert job.attempts == 0
                    return job.next_ms / 1000
        return 0.0
    finally:
        spool.close()


def test_campaign_paused_or_dropped_before_its_time(tmp_path, dns_server, routed) -> None:
    engine = start_http_engine(
        tmp_path, dns={"nameservers": [dns_server.address], "timeout": 5.0},
        delivery={"enabled": True, "port": routed.port, "allow_loopback_mx": True,
                  "retry_initial": 1.0, "retry_max": 1.0, "retry_jitter": 0.0})
    try:
        send_at = time.time() + 4
        for campaign in ("hold", "gone", "keep"):
            _send(engine, f"{campaign}@sched.test", f"{send_at:.3f}", campaign=campaign)
        api = engine.url + "/api/v1/campaigns/default/"
        status, paused, _ = call(api + "hold/pause", "POST", body={"reason": "later"})
        assert status == 200 and paused["paused"]
        status, dropped, _ = call(api + "gone/drop", "POST")
        assert status == 200 and dropped["dropped"] == 1
        assert time.time() < send_at, "the machine was too slow to check anything"
        assert routed.wait_for(messages=1, timeout=send_at - time.time() + 10)
        [keep] = routed.received
        assert keep.rcpt_tos == ("keep@sched.test",) and keep.received_at >= send_at
        held = call(engine.url + "/api/v1/held")[1]
        assert [h["campaign"] for h in held] == ["hold"]
        kinds = {(e["type"], e.get("campaign")) for e in events(tmp_path)}
        assert {("CampaignPaused", "hold"), ("CampaignDropped", "gone")} <= kinds
        assert any(e["type"] == "Dropped" for e in events(tmp_path))
        call(api + "hold/resume", "POST")  # its time has come: it goes now
        assert routed.wait_for(messages=2, timeout=10)
        assert routed.received[1].rcpt_tos == ("hold@sched.test",)
    finally:
        engine.stop()
    assert routed.messages == 2


def test_inject_api_send_at(tmp_path, dns_server, routed) -> None:
    inject_port = free_port()
    config = _config(tmp_path, dns_server, routed.port,
                     inject={"listen": f"127.0.0.1:{inject_port}"},
                     accounts=[{"name": "shop", "api_key_hashes": [api_key_hash(KEY)]}])
    with EngineProcess(tmp_path, config):
        send_at = time.time() + 3
        body = {"envelope_sender": "s@shop.test", "send_at": send_at,
                "recipients": [{"email": "api@sched.test"}],
                "content": {"from": {"email": "s@shop.test"}, "subject": "x",
                            "text_body": "hi"}}
        url = f"http://127.0.0.1:{inject_port}/api/inject/v1"
        wait_for_port("127.0.0.1", inject_port, 10)
        status, reply, _ = call(url, "POST", token=KEY, body=body)
        assert status == 200 and reply["success_count"] == 1, reply
        status, reply, _ = call(url, "POST", token=KEY, body=body | {"send_at": "soon"})
        assert status == 400 and "send_at" in str(reply)
        assert routed.wait_for(messages=1, timeout=send_at - time.time() + 10)
    [message] = routed.received
    assert send_at <= message.received_at < send_at + 1.5



