"""The contract enforced end to end: a real engine (the policy guard wired in by
`mta.policy.wiring.wire_policy`), a real DNS server and sinks on loopback.

- 1,000 recipients, 10 % refused with 550 5.1.1: paused after the minimum volume, the
  rest held, the notice delivered, new mail refused, resume delivers the held mail once;
- ARF complaints through the inbound FBL path at 0.6 %: paused, deferred mail held;
- one-click unsubscribes at 1.1 % through the HTTP listener: paused; forged token refused.
"""

from __future__ import annotations

import asyncio
import json
import re
import smtplib
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from bench.engine_proc import PROJECT_ROOT, EngineProcess, read_events
from bench.load import Submission, make_body, run_load
from bench.rig.sinks import SinkFaults
from tests.helpers.engine import engine_config, wait_until

SENDER = "news@shop.test"


def start(tmp: Path, dns: Any, port: int, delivery: bool = True, **policy: Any) -> EngineProcess:
    config = engine_config(
        tmp, dns={"nameservers": [dns.address], "timeout": 5.0},
        delivery={"enabled": delivery, "port": port, "allow_loopback_mx": True,
                  "retry_initial": 1.0, "retry_max": 1.0, "retry_jitter": 0.0,
                  "connect_timeout": 2.0, "command_timeout": 5.0,
                  "max_concurrent_deliveries": 20},
        smtp={"trusted_account": "shop"},
        policy={"flush_interval": 0.05, **policy},
        accounts=[{"name": "shop", "email": "ops@shop.test", "plan": "standard"}])
    config["http"]["public_url"] = f"http://{config['http']['listen']}"
    return EngineProcess(tmp, config, workers=1).start()


def events(tmp: Path, kind: str, campaign: str | None = None) -> list[dict[str, Any]]:
    return [e for e in read_events(tmp / "events.jsonl", kind)
            if campaign in (None, e.get("campaign"))]


def finals(tmp: Path, campaign: str) -> int:
    return len(events(tmp, "Delivery", campaign)) + len(events(tmp, "Bounce", campaign))


def mta(engine: EngineProcess, *args: str) -> dict[str, Any]:
    run = subprocess.run([sys.executable, "-m", "mta", *args, "--json", "--config",
                          str(engine.config_path)], capture_output=True, text=True, timeout=60,
                         cwd=PROJECT_ROOT, check=True)
    return json.loads(run.stdout)


def submit_all(engine: EngineProcess, campaign: str, rcpts: list[str]) -> None:
    def make(i: int) -> Submission:
        return Submission(SENDER, [rcpts[i]],
                          make_body(600, f"{campaign} {i}", SENDER, rcpts[i], campaign))

    result = asyncio.run(run_load(engine.host, engine.port, make, len(rcpts), sessions=8))
    assert result.accepted == len(rcpts), result.replies


def refusal(engine: EngineProcess, campaign: str) -> str:
    with smtplib.SMTP(engine.host, engine.port) as client:
        body = make_body(300, "late", SENDER, "late@dest.test", campaign)
        with pytest.raises(smtplib.SMTPDataError) as err:
            client.sendmail(SENDER, ["late@dest.test"], body)
    assert err.value.smtp_code == 550
    return err.value.smtp_error.decode()


def held_count(engine: EngineProcess) -> int:
    return mta(engine, "queue", "stats")["by_state"].get("held", 0)


def notice_to_account(sink: Any, campaign: str) -> bool:
    return any(m.rcpt_tos == ("ops@shop.test",) and f"Campaign {campaign} paused".encode()
               in m.data for m in list(sink.received))


def test_hard_bounces_pause_hold_notify_and_resume(tmp_path: Path, dns_server: Any,
                                                   route: Any) -> None:
    dest = route("dest.test", "127.0.0.2", SinkFaults(rcpt_rules=[
        (r"^bad", "550 5.1.1 <bad@dest.test>: Recipient address rejected: User unknown")]))
    shop = route("shop.test", "127.0.0.9")
    rcpts = [f"bad{i}@dest.test" if i % 10 == 5 else f"user{i}@dest.test" for i in range(1000)]
    engine = start(tmp_path, dns_server, dest.port, delivery=False)
    try:
        submit_all(engine, "spring", rcpts)  # all queued before delivery starts
        engine.stop()
        engine.config["delivery"]["enabled"] = True
        engine.start()
        assert wait_until(lambda: events(tmp_path, "CampaignPaused", "spring"), timeout=60)
        paused = events(tmp_path, "CampaignPaused", "spring")[0]
        assert paused["rule"] == "hard_bounce" and paused["base"] >= 200
        assert paused["rate"] >= 8.0 and paused["threshold"] == 8.0
        # What was in flight finishes; everything else of the campaign is held.
        assert wait_until(lambda: finals(tmp_path, "spring") + held_count(engine) == 1000,
                          timeout=30)
        held = held_count(engine)
        assert held >= 500, f"only {held} held"
        assert wait_until(lambda: notice_to_account(shop, "spring"), timeout=20)
        reply = refusal(engine, "spring")
        assert "5.7.1 Campaign spring" in reply and "hard bounce rate" in reply
        assert "threshold of 8%" in reply
        assert finals(tmp_path, "spring") + held_count(engine) == 1000  # nothing lost
        assert mta(engine, "campaign", "resume", "spring", "--account", "shop")["released"] == held
        # It keeps bouncing: judged on the mail sent since the resume, it is paused again
        # once min_volume more were sent.
        assert wait_until(lambda: len(events(tmp_path, "CampaignPaused", "spring")) == 2,
                          timeout=60)
        again = events(tmp_path, "CampaignPaused", "spring")[1]
        assert again["rule"] == "hard_bounce" and 200 <= again["base"] < held
        assert wait_until(lambda: finals(tmp_path, "spring") + held_count(engine) == 1000,
                          timeout=30)
        unguarded = mta(engine, "campaign", "resume", "spring", "--account", "shop",
                        "--no-guard", "the list was checked by hand")
        assert unguarded["guard"] is False
        assert wait_until(lambda: finals(tmp_path, "spring") == 1000, timeout=60)
    finally:
        engine.stop()
    delivered = Counter(r for m in dest.received if m.accepted for r in m.rcpt_tos)
    assert set(delivered) == {r for r in rcpts if r.startswith("user")}
    assert set(delivered.values()) == {1}  # each good recipient exactly once
    bounced = Counter(e["recipient"] for e in events(tmp_path, "Bounce", "spring"))
    assert len(bounced) == 100 and set(bounced.values()) == {1}
    assert len(events(tmp_path, "CampaignPaused", "spring")) == 2  # not again without a guard


def arf_report(verp: str, recipient: str, original: bytes) -> bytes:
    return (f"From: fbl@isp.test\r\nTo: {verp}\r\nSubject: Abuse report\r\nMIME-Version: 1.0\r\n"
            f'Content-Type: multipart/report; report-type=feedback-report; boundary="B"\r\n\r\n'
            f"--B\r\nContent-Type: text/plain\r\n\r\nThis is an email abuse report.\r\n"
            f"--B\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\n"
            f"User-Agent: isp/1.0\r\nVersion: 1\r\nOriginal-Rcpt-To: <{recipient}>\r\n\r\n"
            f"--B\r\nContent-Type: message/rfc822\r\n\r\n").encode() + original + b"\r\n--B--\r\n"


def test_arf_complaints_pause_and_deferred_mail_is_held(tmp_path: Path, dns_server: Any,
                                                        route: Any) -> None:
    dest = route("dest.test", "127.0.0.2")
    slow = route("slow.test", "127.0.0.3", SinkFaults(rcpt_rules=[(r".", "451 4.3.0 later")]))
    shop = route("shop.test", "127.0.0.9")
    rcpts = [f"user{i}@dest.test" for i in range(1000)] + [f"s{i}@slow.test" for i in range(20)]
    engine = start(tmp_path, dns_server, dest.port)
    try:
        submit_all(engine, "fall", rcpts)
        assert wait_until(lambda: len(events(tmp_path, "Delivery", "fall")) == 1000, timeout=60)
        assert wait_until(lambda: mta(engine, "campaign", "show", "fall")["delivered"] == 1000,
                          timeout=10)
        complained = list(dest.received)[:6]
        with smtplib.SMTP(engine.host, engine.port) as client:
            for m in complained:
                report = arf_report(m.mail_from, m.rcpt_tos[0], m.data)
                client.sendmail("fbl@isp.test", [m.mail_from], report)
        assert wait_until(lambda: events(tmp_path, "CampaignPaused", "fall"), timeout=30)
        paused = events(tmp_path, "CampaignPaused", "fall")[0]
        assert paused["rule"] == "complaint" and paused["rate"] == 0.6
        assert paused["count"] == 6 and paused["base"] == 1000
        assert wait_until(lambda: notice_to_account(shop, "fall"), timeout=20)
        assert "complaint rate 0.6%" in refusal(engine, "fall")
        # The deferred mail comes due and is held, not delivered, not bounced.
        assert wait_until(lambda: held_count(engine) == 20, timeout=30)
        slow.faults.rcpt_rules.clear()
        shown = mta(engine, "campaign", "show", "fall")
        assert shown["complaints"] == 6 and shown["held"] == 20
        assert mta(engine, "campaign", "resume", "fall")["released"] == 20
        assert wait_until(lambda: len(events(tmp_path, "Delivery", "fall")) == 1020, timeout=30)
        listed = {r["address"] for r in mta(engine, "suppression", "list", "shop")}
        assert listed == {m.rcpt_tos[0] for m in complained}
    finally:
        engine.stop()
    assert Counter(r for m in slow.received if m.accepted for r in m.rcpt_tos) == Counter(
        rcpts[1000:])
    assert not events(tmp_path, "Bounce", "fall")


def post(url: str) -> int:
    request = urllib.request.Request(url, data=b"List-Unsubscribe=One-Click", method="POST",
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_one_click_unsubscribes_pause_and_forged_tokens_are_refused(
        tmp_path: Path, dns_server: Any, route: Any) -> None:
    dest = route("dest.test", "127.0.0.2")
    route("shop.test", "127.0.0.9")
    rcpts = [f"user{i}@dest.test" for i in range(1000)]
    engine = start(tmp_path, dns_server, dest.port)
    try:
        submit_all(engine, "winter", rcpts)
        assert wait_until(lambda: len(events(tmp_path, "Delivery", "winter")) == 1000, timeout=60)
        assert wait_until(lambda: mta(engine, "campaign", "show", "winter")["delivered"] == 1000,
                          timeout=10)  # counted (batched) before the rates are put to test
        links = {}
        for m in list(dest.received):
            head = m.data.split(b"\r\n\r\n")[0].decode()
            found = re.search(r"List-Unsubscribe: <(http[^>]+)>", head)
            assert found and "List-Unsubscribe-Post: List-Unsubscribe=One-Click" in head
            assert "Email Marketing by" in m.data.decode()  # the footer, standard plan
            links[m.rcpt_tos[0]] = found.group(1)
        assert len(links) == 1000
        url = links["user0@dest.test"]
        assert post(url[:-3] + ("AAA" if url[-3:] != "AAA" else "BBB")) == 400
        for i in range(11):
            assert post(links[f"user{i}@dest.test"]) == 200
            if i == 9:  # ten of a thousand: 1 %, not above the threshold
                assert not events(tmp_path, "CampaignPaused", "winter")
        assert post(links["user3@dest.test"]) == 200  # twice: counted once
        assert wait_until(lambda: events(tmp_path, "CampaignPaused", "winter"), timeout=20)
        paused = events(tmp_path, "CampaignPaused", "winter")[0]
        assert paused["rule"] == "unsubscribe" and paused["rate"] == 1.1
        shown = mta(engine, "campaign", "show", "winter")
        assert shown["unsubscribes"] == 11 and shown["status"] == "paused"
        with smtplib.SMTP(engine.host, engine.port) as client, pytest.raises(
                smtplib.SMTPRecipientsRefused) as err:
            client.sendmail(SENDER, ["user4@dest.test"],
                            make_body(300, "again", SENDER, "user4@dest.test", "spring"))
        code, text = err.value.recipients["user4@dest.test"]
        assert code == 550 and b"suppression list" in text and b"unsubscribed" in text
    finally:
        engine.stop()


def test_trial_review_and_limits_over_smtp(tmp_path: Path, dns_server: Any, route: Any) -> None:
    from mta.smtp.auth import hash_password

    dest = route("dest.test", "127.0.0.2")
    config = engine_config(
        tmp_path, dns={"nameservers": [dns_server.address], "timeout": 5.0},
        delivery={"enabled": True, "port": dest.port, "allow_loopback_mx": True},
        smtp={"trusted_account": "trial"}, policy={"trial_limit": 5},
        accounts=[{"name": "trial", "email": "t@trial.test", "plan": "trial"},
                  {"name": "tiny", "plan": "pro", "subscriber_level": 1,
                   "password_hash": hash_password("pw", log_n=10)}])
    engine = EngineProcess(tmp_path, config, workers=1).start()
    try:
        with smtplib.SMTP(engine.host, engine.port) as client:
            for i in range(3):
                client.sendmail(SENDER, [f"t{i}@dest.test"],
                                make_body(300, f"trial {i}", SENDER, f"t{i}@dest.test"))
            client.sendmail(SENDER, ["t3@dest.test", "t4@dest.test"],
                            make_body(300, "trial 3", SENDER, "t3@dest.test"))
            with pytest.raises(smtplib.SMTPSenderRefused) as err:  # 5 of 5 used
                client.sendmail(SENDER, ["t5@dest.test"], make_body(300, "6", SENDER, "x@y"))
            assert err.value.smtp_code == 550 and b"Trial account trial" in err.value.smtp_error
        held = mta(engine, "hold", "list")
        assert sorted(r for m in held for r in m["recipients"]) == [
            f"t{i}@dest.test" for i in range(5)]
        first, second = sorted(held, key=lambda m: m["recipients"][0])[:2]
        assert mta(engine, "hold", "release", first["id"]) == {"id": first["id"], "released": 1}
        assert mta(engine, "hold", "reject", second["id"])["recipients"] == 1
        assert wait_until(lambda: len(events(tmp_path, "Delivery")) == 1, timeout=20)
        assert [m.rcpt_tos for m in dest.received] == [tuple(first["recipients"])]
        assert [e["recipient"] for e in events(tmp_path, "Rejected")] == second["recipients"]
        assert len(mta(engine, "hold", "list")) == 2
        with smtplib.SMTP(engine.host, engine.port) as client:
            client.login("tiny", "pw")
            rcpts = [f"m{i}@dest.test" for i in range(109)]
            client.sendmail(SENDER, rcpts, make_body(300, "month", SENDER, rcpts[0]))
            with pytest.raises(smtplib.SMTPSenderRefused) as err:
                client.sendmail(SENDER, ["m110@dest.test"], make_body(300, "x", SENDER, "x@y"))
            assert err.value.smtp_code == 452
            assert b"4.7.1 Monthly limit reached" in err.value.smtp_error
    finally:
        engine.stop()
