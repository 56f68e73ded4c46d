"""Operator actions by scope with an expiry: suspend / bounce / resume, through
mta.queue.rules (units on a real LMDB spool), the admin API and the CLI (engines on
loopback), audited, lifted automatically at expiry."""

from __future__ import annotations

import asyncio
import json
import os
import smtplib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from mta.audit import read_audit
from mta.queue.rules import (
    REFRESH_SECONDS,
    RuleCheck,
    RuleError,
    RuleExpiry,
    add_rule,
    lift_rule,
    new_rule,
    parse_duration,
    read_rules,
)
from mta.queue.scheduler import Item
from mta.queue.spool import NewMessage, Spool
from tests.helpers.engine import engine_config, wait_until
from tests.helpers.http import call, start_http_engine
from tests.test_delivery import events

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _store(spool: Spool, *messages: NewMessage) -> None:
    spool.apply([spool.store_op(m) for m in messages])


def _jobs(spool: Spool) -> dict[str, Any]:
    with spool.read() as txn:
        return {job.rcpts[0].address: job for job in spool.jobs(txn)}


def test_rules_parse_and_check() -> None:
    assert parse_duration("90") == 90 and parse_duration("15m") == 900
    assert parse_duration("2h") == 7200 and parse_duration("1d") == 86400
    for bad in ("", "soon", "0", "-5m", "400d"):
        with pytest.raises(RuleError):
            parse_duration(bad)
    rule = new_rule("suspend", "domain", " X.Test. ", duration=60, now=1000.0)
    assert (rule.value, rule.expires, rule.hold_reason) == ("x.test", 1060.0,
                                                            "suspend:domain:x.test")
    for args, kw in ((("pause", "domain", "x"), {"duration": 1}),
                     (("suspend", "planet", "x"), {"duration": 1}),
                     (("suspend", "domain", ""), {"duration": 1}),
                     (("suspend", "domain", "x"), {}),
                     (("suspend", "domain", "x"), {"expires": 10.0, "now": 20.0})):
        with pytest.raises(RuleError):
            new_rule(*args, **kw)
    campaign = new_rule("bounce", "campaign", "shop/spring", duration=1)
    assert campaign.matches("a.test", "shop", "spring")
    assert not campaign.matches("a.test", "other", "spring")
    anyone = new_rule("bounce", "campaign", "spring", duration=1)
    assert anyone.matches("a.test", "other", "spring") and not anyone.matches("a", "o", "")


def test_suspend_holds_lift_releases_and_expiry_lifts(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", map_size=64 * 1024**2)
    later = time.time() + 3600
    _store(spool,
           NewMessage("s@shop.test", ["a@x.test"], b"m", account="free", campaign="c"),
           NewMessage("s@shop.test", ["b@y.test"], b"m", account="shop", send_at=later),
           NewMessage("s@shop.test", ["c@x.test"], b"m", account="other", send_at=later))
    now = time.time()  # after the store: a@x.test, due when stored, is due now
    by_domain = new_rule("suspend", "domain", "x.test", duration=60, now=now)
    [done] = spool.apply([lambda txn: add_rule(spool, txn, by_domain, now)])
    assert done == {"held": 1}  # c@x.test (not due); a@x.test is due: the scheduler holds it
    assert _jobs(spool)["c@x.test"].held == "suspend:domain:x.test"
    by_account = new_rule("suspend", "account", "shop", duration=1, now=now)
    [done] = spool.apply([lambda txn: add_rule(spool, txn, by_account, now)])
    assert done == {"held": 1}  # b@y.test

    check = RuleCheck(spool, clock=lambda: now)
    with spool.read() as txn:
        message = spool.get_message(txn, _jobs(spool)["a@x.test"].msg)
        item = Item(_jobs(spool)["a@x.test"], message, now)
        assert check.hold_reason(item) == "suspend:domain:x.test"
        assert check.still_holds(txn, item.job, "suspend:domain:x.test")
        assert check.bounce_reason(item) is None

    [lifted] = spool.apply([lambda txn: lift_rule(spool, txn, "suspend", "domain", "x.test",
                                                  now)])
    assert lifted["released"] == 1
    released = _jobs(spool)["c@x.test"]
    assert not released.held and released.next_ms == released.not_before_ms  # its send time
    with spool.read() as txn:
        assert not check.still_holds(txn, item.job, "suspend:domain:x.test")

    expiry = RuleExpiry(spool, _submit(spool), lambda event: emitted.append(event))
    emitted: list[dict[str, Any]] = []
    assert asyncio.run(expiry.lift_expired(now + 0.5)) == []
    [item_lifted] = asyncio.run(expiry.lift_expired(now + 2))
    assert item_lifted["released"] == 1 and not _jobs(spool)["b@y.test"].held
    assert emitted[0]["type"] == "QueueRuleLifted" and emitted[0]["by"] == "expiry"
    with spool.read() as txn:
        assert read_rules(spool, txn) == []
    spool.close()


def test_bounce_rule_makes_matching_mail_due(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", map_size=64 * 1024**2)
    now = time.time()
    _store(spool, NewMessage("s@shop.test", ["a@x.test"], b"m", campaign="c",
                             account="shop", send_at=now + 3600),
           NewMessage("s@shop.test", ["b@x.test"], b"m", account="shop", send_at=now + 3600))
    suspend = new_rule("suspend", "domain", "x.test", duration=60, now=now)
    spool.apply([lambda txn: add_rule(spool, txn, suspend, now)])
    bounce = new_rule("bounce", "campaign", "shop/c", duration=60, now=now, reason="spam")
    [done] = spool.apply([lambda txn: add_rule(spool, txn, bounce, now)])
    assert done == {"due": 1}
    assert _jobs(spool)["a@x.test"].next_ms <= int(now * 1000) + 1
    assert _jobs(spool)["b@x.test"].held  # not of the campaign
    check = RuleCheck(spool, clock=lambda: now)
    job = _jobs(spool)["a@x.test"]
    item = Item(job, {"account": "shop", "campaign": "c"}, now)
    assert check.bounce_reason(item) == "bounced by an operator (campaign shop/c): spam"
    assert check.bounce_reason(Item(job, {"account": "shop", "campaign": "c",
                                          "dsn_for": "X"}, now)) is None
    spool.close()


def _submit(spool: Spool):
    async def submit(op: Any) -> Any:
        [result] = spool.apply([op])
        if isinstance(result, BaseException):
            raise result
        return result
    return submit


# --- engines ---------------------------------------------------------------------------


@pytest.fixture
def routed(dns_server, asyncio_sink_factory):
    for domain in ("held.test", "free.test"):
        dns_server.add_mx(domain, [(10, "mx.rules.test")])
    dns_server.add_a("mx.rules.test", "127.0.0.2")
    return asyncio_sink_factory(host="127.0.0.2", record=True)


def _engine(tmp: Path, dns: Any, port: int):
    return start_http_engine(
        tmp, dns={"nameservers": [dns.address], "timeout": 5.0},
        delivery={"enabled": True, "port": port, "allow_loopback_mx": True,
                  "retry_initial": 1.0, "retry_max": 1.0, "retry_jitter": 0.0})


def _send(engine: Any, rcpt: str, send_at: float | None = None) -> None:
    extra = f"X-Send-At: {send_at:.3f}\r\n" if send_at else ""
    with smtplib.SMTP(engine.host, engine.port) as client:
        client.sendmail("s@shop.test", [rcpt],
                        f"From: s@shop.test\r\nTo: {rcpt}\r\nSubject: r\r\n{extra}\r\nhi\r\n")


def test_suspend_by_api_holds_new_mail_and_lifts_at_expiry(tmp_path, dns_server,
                                                           routed) -> None:
    engine = _engine(tmp_path, dns_server, routed.port)
    api = engine.url + "/api/v1/queue/"
    try:
        _send(engine, "queued@held.test", send_at=time.time() + 1)  # queued, not due yet
        status, done, _ = call(api + "suspend", "POST", body={
            "scope": "domain", "value": "held.test", "duration": "3s", "reason": "outage"})
        assert status == 200 and done["held"] == 1, done
        expires = done["rule"]["expires"]
        _send(engine, "new@held.test")  # new mail of the scope waits, not refused
        _send(engine, "other@free.test")
        assert routed.wait_for(messages=1, timeout=10)
        assert [m.rcpt_tos for m in routed.received] == [("other@free.test",)]
        [rule] = call(api + "rules")[1]["rules"]
        assert (rule["action"], rule["scope"], rule["value"], rule["reason"]) == (
            "suspend", "domain", "held.test", "outage") and 0 < rule["left"] <= 3
        assert wait_until(lambda: len(call(engine.url + "/api/v1/held")[1]) == 2, timeout=5)
        assert time.time() < expires, "the machine was too slow to check anything"
        assert routed.wait_for(messages=3, timeout=expires - time.time() + 10)
        late = [m for m in routed.received if m.rcpt_tos[0].endswith("@held.test")]
        assert all(expires <= m.received_at < expires + 3 for m in late)
        assert call(api + "rules")[1]["rules"] == []
        # The event log is written in batches: wait for the line, not for a moment.
        assert wait_until(lambda: events(tmp_path, "QueueRuleLifted"), timeout=10)
        lifted = events(tmp_path, "QueueRuleLifted")
        assert lifted and lifted[0]["by"] == "expiry" and lifted[0]["released"] == 2
        status, body, _ = call(api + "suspend", "POST", body={"scope": "planet",
                                                             "value": "x", "duration": 5})
        assert status == 400 and "scope" in body["error"]
        status, body, _ = call(api + "resume", "POST", body={"scope": "domain",
                                                            "value": "held.test"})
        assert status == 404
    finally:
        engine.stop()
    actions = [r for r in read_audit(tmp_path / "audit.jsonl") if r.get("action")]
    assert any(r["action"] == "queue.suspend" and r["object"] == "domain:held.test"
               and r.get("result") == "ok" for r in actions), actions


def bounces_to(workdir: Path, domain: str) -> list[dict[str, Any]]:
    """The Bounce events of recipients at `domain`: not those of the notices to the sender
    (shop.test does not exist, so each notice bounces too, a few ms after its bounce)."""
    return [e for e in events(workdir, "Bounce") if e["recipient"].endswith("@" + domain)]


def test_bounce_by_api_bounces_queued_and_new_mail_then_resume(tmp_path, dns_server,
                                                               routed) -> None:
    engine = _engine(tmp_path, dns_server, routed.port)
    api = engine.url + "/api/v1/queue/"
    try:
        _send(engine, "queued@held.test", send_at=time.time() + 3600)
        status, done, _ = call(api + "bounce", "POST", body={
            "scope": "domain", "value": "held.test", "expires": time.time() + 3600,
            "reason": "closed"})
        assert status == 200 and done["due"] == 1, done
        _send(engine, "new@held.test")
        assert wait_until(lambda: len(bounces_to(tmp_path, "held.test")) == 2, timeout=10)
        bounced = {e["recipient"]: e for e in bounces_to(tmp_path, "held.test")}
        assert set(bounced) == {"queued@held.test", "new@held.test"}
        assert "closed" in bounced["new@held.test"]["reply"]
        status, done, _ = call(api + "resume", "POST", body={
            "scope": "domain", "value": "held.test", "action": "bounce"})
        assert status == 200, done
        _send(engine, "after@held.test")
        assert routed.wait_for(messages=1, timeout=10)
    finally:
        engine.stop()
    assert [m.rcpt_tos for m in routed.received if m.rcpt_tos[0].endswith("held.test")] == [
        ("after@held.test",)]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "mta", *args], capture_output=True,
                            text=True, cwd=PROJECT_ROOT, timeout=60,
                            env=dict(os.environ, PYTHONPATH=str(PROJECT_ROOT)))
    assert "Traceback" not in result.stderr, result.stderr
    return result


def test_cli_offline_suspend_rules_resume(tmp_path: Path) -> None:
    config = engine_config(tmp_path)
    spool = Spool(tmp_path / "spool", map_size=64 * 1024**2)
    _store(spool, NewMessage("s@shop.test", ["a@x.test"], b"m", account="shop",
                             campaign="spring", send_at=time.time() + 3600))
    spool.close()
    path = tmp_path / "mta.toml"
    path.write_text(tomli_w.dumps(config))
    conf = ("--config", str(path), "--offline")
    done = _cli("queue", "suspend", "--campaign", "shop/spring", "--duration", "2h",
                "--reason", "check", *conf, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["held"] == 1
    rules = json.loads(_cli("queue", "rules", *conf, "--json").stdout)
    assert [(r["action"], r["scope"], r["value"]) for r in rules] == [
        ("suspend", "campaign", "shop/spring")]
    assert 7100 < rules[0]["left"] <= 7200
    shown = _cli("queue", "rules", *conf)
    assert "shop/spring" in shown.stdout
    bad = _cli("queue", "suspend", "--domain", "x.test", "--duration", "soon", *conf)
    assert bad.returncode != 0 and "duration" in bad.stderr
    resumed = _cli("queue", "resume", "--campaign", "shop/spring", *conf, "--json")
    assert resumed.returncode == 0 and json.loads(resumed.stdout)["released"] == 1
    again = _cli("queue", "resume", "--campaign", "shop/spring", *conf)
    assert again.returncode != 0 and "no suspend rule" in again.stderr
    audit = [r.get("action") for r in read_audit(tmp_path / "audit.jsonl")]
    assert "queue.suspend" in audit and "queue.resume.suspend" in audit


# --- provider and source scopes (known at dispatch) --------------------------------------

def test_provider_and_source_rules_match_at_dispatch(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", map_size=64 * 1024**2)
    now = time.time()
    _store(spool, NewMessage("s@shop.test", ["a@x.test"], b"m", account="shop",
                             send_at=now + 3600))
    by_provider = new_rule("suspend", "provider", " BigMail ", duration=60, now=now)
    assert by_provider.value == "bigmail" and by_provider.hold_reason == (
        "suspend:provider:bigmail")
    [done] = spool.apply([lambda txn: add_rule(spool, txn, by_provider, now)])
    assert done == {"held": 0, "when_due": True}  # the provider is known once routed
    assert not _jobs(spool)["a@x.test"].held
    bounce = new_rule("bounce", "source", "ip-1", duration=60, now=now, reason="listed")
    [done] = spool.apply([lambda txn: add_rule(spool, txn, bounce, now)])
    assert done == {"due": 0, "when_due": True}
    assert _jobs(spool)["a@x.test"].next_ms > int(now * 1000) + 1000  # not made due
    suspend_source = new_rule("suspend", "source", "IP-2", duration=60, now=now)
    spool.apply([lambda txn: add_rule(spool, txn, suspend_source, now)])

    check = RuleCheck(spool, clock=lambda: now)
    job = _jobs(spool)["a@x.test"]
    item = Item(job, {"account": "shop"}, now)
    assert check.hold_reason(item) is None and check.bounce_reason(item) is None
    item.provider = "BigMail"  # routed: delivery knows the provider now
    assert check.hold_reason(item) == "suspend:provider:bigmail"
    with spool.read() as txn:
        assert check.still_holds(txn, job, "suspend:provider:bigmail")
    item.provider, item.source = "other", "ip-1"
    assert check.bounce_reason(item) == "bounced by an operator (source ip-1): listed"
    with spool.read() as txn:
        assert check.still_bounces(txn, item)
    assert check.source_rule("ip-1") == bounce
    assert check.source_rule("Ip-2") == suspend_source
    assert check.source_rule("ip-3") is None
    both = new_rule("suspend", "source", "ip-1", duration=60, now=now)
    spool.apply([lambda txn: add_rule(spool, txn, both, now)])
    check.refresh()
    assert check.source_rule("ip-1") == bounce  # a bounce rule wins over a suspension
    spool.close()


PROVIDER_SHAPING = """
[default]
max_connections = 5

[provider.bigmail]
mx_suffixes = ["mx.rules.test"]
"""


def test_provider_suspend_holds_at_dispatch_resume_releases_bounce(
        tmp_path, dns_server, routed) -> None:
    dns_server.add_mx("other.test", [(10, "mx.elsewhere.test")])
    dns_server.add_a("mx.elsewhere.test", "127.0.0.2")
    shaping = tmp_path / "shaping.toml"
    shaping.write_text(PROVIDER_SHAPING)
    engine = start_http_engine(
        tmp_path / "engine", dns={"nameservers": [dns_server.address], "timeout": 5.0},
        delivery={"enabled": True, "port": routed.port, "allow_loopback_mx": True,
                  "retry_initial": 1.0, "retry_max": 1.0, "retry_jitter": 0.0},
        throttle={"shaping_file": str(shaping)})
    api = engine.url + "/api/v1/queue/"
    try:
        status, done, _ = call(api + "suspend", "POST", body={
            "scope": "provider", "value": "bigmail", "duration": "1h", "reason": "outage"})
        assert status == 200 and done["when_due"], done
        time.sleep(2 * REFRESH_SECONDS)  # workers see a new rule within REFRESH_SECONDS
        _send(engine, "a@held.test")  # both domains' MX is the provider's
        _send(engine, "b@free.test")
        _send(engine, "c@other.test")  # another MX: not the provider's
        assert routed.wait_for(messages=1, timeout=15)
        assert wait_until(lambda: len(call(engine.url + "/api/v1/held")[1]) == 2, timeout=15)
        held = call(engine.url + "/api/v1/held")[1]
        assert {h["reason"] for h in held} == {"suspend:provider:bigmail"}
        assert [m.rcpt_tos for m in routed.received] == [("c@other.test",)]
        status, done, _ = call(api + "resume", "POST", body={"scope": "provider",
                                                            "value": "bigmail"})
        assert status == 200 and done["released"] == 2, done
        assert routed.wait_for(messages=3, timeout=15)
        status, done, _ = call(api + "bounce", "POST", body={
            "scope": "provider", "value": "bigmail", "duration": "1h", "reason": "closed"})
        assert status == 200, done
        time.sleep(2 * REFRESH_SECONDS)
        _send(engine, "d@held.test")
        assert wait_until(lambda: len(bounces_to(tmp_path / "engine", "held.test")) == 1,
                          timeout=15)
        [bounced] = bounces_to(tmp_path / "engine", "held.test")
        assert bounced["recipient"] == "d@held.test" and "closed" in bounced["reply"]
        rules = call(api + "rules")[1]["rules"]
        assert [(r["action"], r["scope"], r["value"]) for r in rules] == [
            ("bounce", "provider", "bigmail")]
    finally:
        engine.stop()
    assert len(routed.received) == 3
    # held at dispatch after being marked as sending: not a possible duplicate once sent
    assert not [e for e in events(tmp_path / "engine", "Delivery")
                if e.get("possible_duplicate")]
    actions = [(r["action"], r["object"]) for r in read_audit(tmp_path / "engine" / "audit.jsonl")
               if r.get("action")]
    assert ("queue.suspend", "provider:bigmail") in actions
    assert ("queue.bounce", "provider:bigmail") in actions


def test_cli_source_and_provider_scopes(tmp_path: Path) -> None:
    config = engine_config(tmp_path)
    path = tmp_path / "mta.toml"
    path.write_text(tomli_w.dumps(config))
    Spool(tmp_path / "spool", map_size=64 * 1024**2).close()
    conf = ("--config", str(path), "--offline")
    done = _cli("queue", "suspend", "--source", "ip-1", "--duration", "1h", *conf, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["when_due"] is True
    assert _cli("queue", "bounce", "--provider", "BigMail", "--duration", "5m",
                "--reason", "closed", *conf).returncode == 0
    rules = json.loads(_cli("queue", "rules", *conf, "--json").stdout)
    assert [(r["action"], r["scope"], r["value"]) for r in rules] == [
        ("bounce", "provider", "bigmail"), ("suspend", "source", "ip-1")]
    assert _cli("queue", "resume", "--source", "ip-1", *conf).returncode == 0
    assert _cli("queue", "resume", "--provider", "bigmail", "--bounce", *conf).returncode == 0
    audit = [(r.get("action"), r.get("object")) for r in read_audit(tmp_path / "audit.jsonl")]
    assert ("queue.suspend", "source:ip-1") in audit
    assert ("queue.resume.bounce", "provider:bigmail") in audit
