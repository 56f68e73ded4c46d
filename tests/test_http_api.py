"""The admin API, the audit log and `mta admin` against a real engine on loopback."""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mta.audit import read_audit
from mta.smtp.auth import hash_password
from tests.helpers.engine import wait_until
from tests.helpers.http import TOKEN, HttpEngine, call, start_http_engine

ALICE = "alice-token-abcdefghijklmnop"
CAMPAIGNS = {"spring": 3, "autumn": 2, "winter": 2, "": 1}
ENDPOINTS = [
    ("GET", "/api/v1/dashboard"), ("GET", "/api/v1/queue"), ("GET", "/api/v1/messages"),
    ("GET", "/api/v1/messages/X"), ("GET", "/api/v1/campaigns"),
    ("GET", "/api/v1/campaigns/default/spring"),
    ("POST", "/api/v1/campaigns/default/spring/pause"),
    ("POST", "/api/v1/campaigns/default/spring/resume"),
    ("POST", "/api/v1/campaigns/default/spring/drop"), ("GET", "/api/v1/throttle"),
    ("GET", "/api/v1/suppression/default"), ("POST", "/api/v1/suppression/default"),
    ("DELETE", "/api/v1/suppression/default/a@b.test"), ("GET", "/api/v1/held"),
    ("POST", "/api/v1/held/J.0/release"), ("POST", "/api/v1/held/J.0/reject"),
    ("GET", "/api/v1/accounts"), ("GET", "/api/v1/accounts/shop"),
    ("POST", "/api/v1/accounts/shop/suspend"), ("POST", "/api/v1/accounts/shop/resume"),
    ("GET", "/api/v1/no-such-endpoint"),
]


def message(n: int, campaign: str) -> bytes:
    header = f"X-Campaign-ID: {campaign}\r\n" if campaign else ""
    return (f"From: a@shop.test\r\nTo: u{n}@dest.test\r\nSubject: m{n}\r\n{header}\r\n"
            f"body {n}\r\n").encode()


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpEngine]:
    tmp = tmp_path_factory.mktemp("api")
    e = start_http_engine(
        tmp, workers=2,
        http={"operator_tokens": {"alice": ALICE}, "max_auth_failures": 1000},
        accounts=[{"name": "shop", "password_hash": hash_password("right-password"),
                   "email": "ops@shop.test", "plan": "trial", "subscriber_level": 500}])
    n = 0
    with smtplib.SMTP(e.host, e.port) as client:
        for campaign, count in CAMPAIGNS.items():
            for _ in range(count):
                client.sendmail("a@shop.test", [f"u{n}@dest.test"], message(n, campaign))
                n += 1
    yield e
    e.stop()


def api(e: HttpEngine, path: str, method: str = "GET", **kw: Any) -> Any:
    status, body, _ = call(e.url + path, method, **kw)
    assert status == 200, (status, body)
    return body


def mta(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mta", *args], capture_output=True, text=True,
                          check=check, timeout=60)


def audit(e: HttpEngine) -> list[dict[str, Any]]:
    return read_audit(e.config["engine"]["audit_log"], limit=100_000)


def test_no_token_or_a_wrong_one_gets_401_everywhere_and_is_audited(engine: HttpEngine) -> None:
    for method, path in ENDPOINTS:
        for token in (None, "wrong-token", ""):
            status, body, headers = call(engine.url + path, method, token=token)
            assert status == 401, (method, path, token, status)
            assert headers["WWW-Authenticate"].startswith("Bearer")
            assert "token" in body["error"]
    status, _, _ = call(engine.url + "/api/v1/queue", raw=b"", token=None)
    assert status == 401
    failed = [r for r in audit(engine) if r["type"] == "auth" and r["channel"] == "admin-api"]
    assert len(failed) >= 3 * len(ENDPOINTS)
    assert all(r["result"] == "failed" and r["client"] == "127.0.0.1" for r in failed)
    text = Path(engine.config["engine"]["audit_log"]).read_text()
    assert "wrong-token" not in text and TOKEN not in text


def test_queue_and_messages_match_the_spool(engine: HttpEngine) -> None:
    stats = api(engine, "/api/v1/queue")
    cli = json.loads(mta("queue", "stats", "--json", "--config", str(engine.config_path)).stdout)
    assert stats == cli and isinstance(stats["total"], int)
    listing = api(engine, "/api/v1/messages?limit=3")
    assert len(listing) == 3 and all("data" not in m for m in listing)
    one = api(engine, f"/api/v1/messages/{listing[0]['id']}")
    assert one["id"] == listing[0]["id"] and one["jobs"][0]["rcpts"][0][1] == "queued"
    status, body, _ = call(engine.url + "/api/v1/messages/NOPE")
    assert status == 404 and "NOPE" in body["error"]
    assert call(engine.url + "/api/v1/messages?limit=abc")[0] == 400


def test_pause_resume_drop_a_campaign_and_release_or_reject_held_mail(
        engine: HttpEngine) -> None:
    campaigns = api(engine, "/api/v1/campaigns")
    assert campaigns["thresholds"]["hard_bounce"] == pytest.approx(0.08)
    names = {c["campaign"]: c for c in campaigns["campaigns"]}
    assert names["spring"]["queued"] == 3 and not names["spring"]["paused"]

    guard = guard_wired(engine)
    paused = api(engine, "/api/v1/campaigns/default/spring/pause", "POST",
                 body={"reason": "looks like a purchased list"})
    assert paused["paused"] and paused["held"] + paused["queued"] == 3
    if not guard:  # the stand-in holds at once; the guard holds due jobs as they come up
        assert paused["held"] == 3 and api(engine, "/api/v1/queue")["by_state"]["held"] == 3
    assert api(engine, "/api/v1/campaigns/default/spring")["paused"]
    resumed = api(engine, "/api/v1/campaigns/default/spring/resume", "POST")
    assert not resumed["paused"] and resumed["queued"] == 3 and resumed["held"] == 0

    before = api(engine, "/api/v1/queue")["total"]
    dropped = api(engine, "/api/v1/campaigns/default/autumn/drop", "POST")
    assert dropped["dropped"] == 2
    assert api(engine, "/api/v1/queue")["total"] == before - 2
    status, after, _ = call(engine.url + "/api/v1/campaigns/default/autumn")
    assert status == 404 or after["queued"] == after["held"] == 0  # the guard keeps its record

    if guard:  # a trial account's mail is held for review
        with smtplib.SMTP(engine.host, engine.port) as client:
            client.login("shop", "right-password")
            for n in (900, 901):
                client.sendmail("a@shop.test", [f"u{n}@dest.test"], message(n, "winter"))
    else:  # an operator's pause holds the campaign's mail
        api(engine, "/api/v1/campaigns/default/winter/pause", "POST")
    winter = [h for h in api(engine, "/api/v1/held") if h["campaign"] == "winter"]
    assert len(winter) == 2
    assert guard or winter[0]["reason"] == "campaign:default/winter"
    api(engine, f"/api/v1/held/{winter[0]['job']}/release", "POST")
    api(engine, f"/api/v1/held/{winter[1]['job']}/reject", "POST")
    assert not [h for h in api(engine, "/api/v1/held") if h["campaign"] == "winter"]
    assert api(engine, f"/api/v1/messages/{winter[0]['message']}")["jobs"][0].get("held") is None
    assert call(engine.url + f"/api/v1/messages/{winter[1]['message']}")[0] == 404
    assert call(engine.url + f"/api/v1/held/{winter[1]['job']}/reject", "POST")[0] == 404

    actions = [(r["action"], r["object"], r["result"]) for r in audit(engine)
               if r["type"] == "action" and r["identity"] == "admin"]
    for expected in [("campaign.pause", "default/spring", "ok"),
                     ("campaign.resume", "default/spring", "ok"),
                     ("campaign.drop", "default/autumn", "ok"),
                     ("held.release", winter[0]["job"], "ok"),
                     ("held.reject", winter[1]["job"], "ok")]:
        assert expected in actions
    assert any(a == "held.reject" and r.startswith("error: NotFound") for a, _, r in actions)
    pause = next(r for r in audit(engine) if r.get("action") == "campaign.pause")
    assert pause["reason"] == "looks like a purchased list"


def guard_wired(e: HttpEngine) -> bool:
    """True once the engine wires the policy guard's PolicyOperations (worker.policy_admin)."""
    status = call(e.url + "/api/v1/suppression/shop")[0]
    assert status in (200, 501)
    return status == 200


def test_accounts_throttle_dashboard_and_named_operators(engine: HttpEngine) -> None:
    accounts = api(engine, "/api/v1/accounts")
    assert "shop" in [a["name"] for a in accounts]
    assert "password_hash" not in json.dumps(accounts)
    shop = api(engine, "/api/v1/accounts/shop", token=ALICE)
    assert shop["plan"] == "trial" and shop["subscriber_level"] == 500
    assert call(engine.url + "/api/v1/accounts/nobody")[0] == 404
    assert isinstance(api(engine, "/api/v1/throttle")["rows"], list)
    board = api(engine, "/api/v1/dashboard")
    reviewed = 2 if guard_wired(engine) else 0  # sent for review by the pause test
    assert board["totals"]["received"] == sum(CAMPAIGNS.values()) + reviewed
    assert board["queue"]["total"] == api(engine, "/api/v1/queue")["total"]
    assert board["destinations"][0]["destination"] == "dest.test"
    assert any(r["type"] == "access" and r["identity"] == "alice"
               and r["path"] == "/api/v1/accounts/shop" and r["status"] == 200
               for r in audit(engine))


def test_suppression_and_account_suspension(engine: HttpEngine) -> None:
    assert call(engine.url + "/api/v1/suppression/shop", "POST", body={"nope": 1})[0] == 400
    assert call(engine.url + "/api/v1/suppression/shop", "POST", raw=b"[1,")[0] == 400
    calls = [("POST", "/api/v1/suppression/shop", {"address": "x@y.test", "reason": "asked"}),
             ("GET", "/api/v1/suppression/shop", None),
             ("DELETE", "/api/v1/suppression/shop/x@y.test", None),
             ("POST", "/api/v1/accounts/shop/suspend", {"reason": "abuse"}),
             ("POST", "/api/v1/accounts/shop/resume", None)]
    if not guard_wired(engine):
        # Without the policy guard, what only it knows answers 501, clearly.
        for method, path, body in calls:
            status, reply, _ = call(engine.url + path, method, body=body)
            assert status == 501 and "policy guard" in reply["error"], (path, status)
        assert any(r.get("action") == "account.suspend" and r["identity"] == "admin"
                   and r["result"].startswith("error: PolicyUnavailable")
                   for r in audit(engine))
        return
    replies = [call(engine.url + path, method, body=body) for method, path, body in calls]
    assert [status for status, _, _ in replies] == [200] * 5
    assert "x@y.test" in json.dumps(replies[1][1])
    assert "x@y.test" not in json.dumps(api(engine, "/api/v1/suppression/shop"))
    assert replies[3][1]["suspended"] and not replies[4][1]["suspended"]
    assert any(r.get("action") == "account.suspend" and r["result"] == "ok"
               for r in audit(engine))


def test_smtp_auth_attempts_are_audited(engine: HttpEngine) -> None:
    with smtplib.SMTP(engine.host, engine.port) as client:
        client.ehlo()
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("shop", "wrong-password")
    with smtplib.SMTP(engine.host, engine.port) as client:
        client.ehlo()
        client.login("shop", "right-password")

    def smtp_records() -> list[dict[str, Any]]:
        return [r for r in audit(engine) if r.get("channel") == "smtp"]

    assert wait_until(lambda: len(smtp_records()) >= 2, timeout=5)
    results = [(r["identity"], r["result"], r["client"]) for r in smtp_records()]
    assert ("shop", "failed", "127.0.0.1") in results and ("shop", "ok", "127.0.0.1") in results
    text = Path(engine.config["engine"]["audit_log"]).read_text()
    assert "password" not in text


def test_mta_admin_cli(engine: HttpEngine) -> None:
    config = ["--config", str(engine.config_path)]
    status = mta("admin", "status", *config).stdout
    received = api(engine, "/api/v1/dashboard")["totals"]["received"]
    assert f"received {received:.0f} " in status and "paused campaigns:" in status
    listed = json.loads(mta("admin", "campaigns", "--json", *config).stdout)
    assert {c["campaign"] for c in listed["campaigns"]} >= {"spring", "winter"}
    out = mta("admin", "campaign", "default", "spring", "pause", "--reason", "cli", *config)
    assert "paused" in out.stdout
    assert "paused" in next(line for line in mta("admin", "campaigns", *config).stdout
                            .splitlines() if " spring " in line)
    assert mta("admin", "held", *config).stdout.startswith("job")
    mta("admin", "campaign", "default", "spring", "resume", "--url", engine.url,
        "--token", ALICE, *config)
    assert not json.loads(mta("admin", "campaign", "default", "spring", "--json",
                              *config).stdout)["paused"]
    assert any(r.get("action") == "campaign.resume" and r["identity"] == "alice"
               for r in audit(engine))
    assert "shop" in mta("admin", "accounts", *config).stdout
    bad = mta("admin", "queue", "--token", "nope", *config, check=False)
    assert bad.returncode == 2 and "HTTP 401" in bad.stderr and "Traceback" not in bad.stderr
    gone = mta("admin", "queue", "--url", "http://127.0.0.1:9", *config, check=False)
    assert gone.returncode == 2 and "cannot reach the engine" in gone.stderr


def test_api_off_without_a_token_and_repeated_failures_refused(tmp_path: Path) -> None:
    off = start_http_engine(tmp_path / "off", token="")
    try:
        status, body, _ = call(off.url + "/api/v1/queue")
        assert status == 403 and "admin_token" in body["error"]
        assert call(off.url + "/metrics", token=None)[0] == 200  # metrics stay on
    finally:
        off.stop()
    strict = start_http_engine(tmp_path / "strict", http={"max_auth_failures": 3})
    try:
        assert [call(strict.url + "/api/v1/queue", token="bad")[0] for _ in range(3)] == [401] * 3
        assert call(strict.url + "/api/v1/queue", token="bad")[0] == 429
        assert call(strict.url + "/api/v1/queue")[0] == 429  # even the right token, for now
        assert any(r.get("result") == "refused" for r in audit(strict))
    finally:
        strict.stop()
