"""The injection API in a real engine: `POST /api/inject/v1` over loopback, the LMDB
spool, a DNS server and a recording sink as the recipients' MX.

- 1,000 recipients in one request: 1,000 personalised messages in the spool before the
  200, and a kill -9 right after the reply loses none;
- an API message and the same message over SMTP arrive byte-identical but for the trace
  and per-message fields, both DKIM signatures verifying;
- suppressed recipients and a paused campaign fail with the SMTP path's replies, the
  others are delivered;
- bad input: its status, and nothing spooled.
"""

from __future__ import annotations

import base64
import json
import re
import smtplib
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bench.engine_proc import PROJECT_ROOT, EngineProcess, read_events
from bench.net import free_port, wait_for_port
from mta.config import load_config
from mta.inject.auth import ApiKeys, api_key_hash, new_api_key
from mta.inject.mime import Attachment, Mailbox, Parts, reference_bytes
from mta.queue.spool import Spool
from mta.smtp.auth import hash_password
from tests.helpers.dkim import dkimpy_results, write_key
from tests.helpers.engine import engine_config, spooled_ids, wait_until

KEY = new_api_key()
PASSWORD = "s3cret pass"
ADMIN = "admin-token-for-tests"
BEARER = {"Authorization": f"Bearer {KEY}"}
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 4


class Api:
    """An engine with the injection API, and a client for it."""

    def __init__(self, tmp: Path, workers: int = 1, **sections: Any) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}/api/inject/v1"
        inject = {"listen": f"127.0.0.1:{port}", **sections.pop("inject", {})}
        config = engine_config(
            tmp, inject=inject, smtp={"trusted_account": "shop", **sections.pop("smtp", {})},
            http={"admin_token": ADMIN},
            accounts=[{"name": "shop", "email": "ops@shop.test",
                       "password_hash": hash_password(PASSWORD, 10),
                       "api_key_hashes": [api_key_hash(KEY)]}], **sections)
        self.tmp = tmp
        self.engine = EngineProcess(tmp, config, workers=workers).start()
        wait_for_port("127.0.0.1", port, 10)

    def post(self, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(self.url, data=data, method="POST",
                                         headers=BEARER if headers is None else headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def admin(self, path: str, body: dict[str, Any]) -> None:
        request = urllib.request.Request(
            f"http://{self.engine.config['http']['listen']}/api/v1/{path}", method="POST",
            data=json.dumps(body).encode(), headers={"Authorization": f"Bearer {ADMIN}"})
        with urllib.request.urlopen(request, timeout=10) as reply:
            assert reply.status == 200

    def smtp_reply(self, rcpt: str, data: bytes) -> str:
        """SMTP's reply refusing `rcpt` or the message ('' when it is accepted)."""
        try:
            with smtplib.SMTP(self.engine.host, self.engine.port, timeout=10) as client:
                client.sendmail("bounce@shop.test", [rcpt], data)
        except smtplib.SMTPRecipientsRefused as err:
            code, text = err.recipients[rcpt]
            return f"{code} {text.decode()}"
        except smtplib.SMTPDataError as err:
            return f"{err.smtp_code} {err.smtp_error.decode()}"
        return ""


def delivering(dns: Any, sink_port: int) -> dict[str, Any]:
    return {"dns": {"nameservers": [dns.address], "timeout": 5.0},
            "delivery": {"enabled": True, "port": sink_port, "allow_loopback_mx": True}}


def spring(recipients: list[dict[str, Any]], **content: Any) -> dict[str, Any]:
    return {"envelope_sender": "bounce@shop.test", "campaign": "spring",
            "recipients": recipients, "substitutions": {"shop": "Shop"},
            "content": {"from": {"email": "news@shop.test", "name": "{{ shop }}"},
                        "subject": "Hello {{ name }}", "text_body": "Your code: {{ code }}\n",
                        **content}}


def spool_messages(path: Path) -> list[dict[str, Any]]:
    spool = Spool(path, readonly=True)
    try:
        with spool.read() as txn:
            return list(spool.messages(txn))
    finally:
        spool.close()


# --- durable before the reply ----------------------------------------------------------------


def test_a_thousand_personalised_messages_are_spooled_before_the_reply(tmp_path: Path) -> None:
    api = Api(tmp_path)
    rcpts = [{"email": f"user{i}@dest{i % 7}.test", "name": f"User {i}",
              "substitutions": {"code": f"C{i:04d}"}} for i in range(1000)]
    try:
        status, reply = api.post(spring(rcpts, html_body="<p>{{ code }} for {{ email }}</p>"))
    finally:
        api.engine.kill9()  # right after the reply: what it promised must be on disk
    assert status == 200, reply
    assert reply == {"success_count": 1000, "fail_count": 0, "failed_recipients": [],
                     "errors": []}
    messages = spool_messages(tmp_path / "spool")
    assert len(messages) == 1000
    for message in messages:
        [rcpt] = message["rcpts"]
        i = int(re.fullmatch(r"user(\d+)@dest\d\.test", rcpt)[1])
        data = message["data"]
        assert f"To: User {i} <{rcpt}>\r\n".encode() in data
        assert f"Subject: Hello User {i}\r\n".encode() in data
        assert f"Your code: C{i:04d}\r\n".encode() in data
        assert f"<p>C{i:04d} for {rcpt}</p>".encode() in data
        assert message["account"] == "shop" and message["campaign"] == "spring"
        assert message["from"] == "bounce@shop.test"


# --- the same message as over SMTP -------------------------------------------------------------

TRACE_FIELDS = {b"received", b"message-id", b"date", b"dkim-signature", b"cfbl-feedback-id"}


def without_trace(data: bytes) -> tuple[bytes, set[bytes]]:
    """The message without the fields that differ from copy to copy, and their names."""
    head, _, body = data.partition(b"\r\n\r\n")
    kept, dropped = [], set()
    for field in re.split(rb"\r\n(?![ \t])", head):
        name = field.split(b":", 1)[0].strip().lower()
        (dropped.add(name) if name in TRACE_FIELDS else kept.append(field))
    return b"\r\n".join(kept) + b"\r\n\r\n" + body, dropped


def test_an_api_message_and_the_same_over_smtp_arrive_alike_and_signed(
        tmp_path: Path, dns_server: Any, route: Any) -> None:
    dest = route("dest.test", "127.0.0.2")
    key = write_key(tmp_path, "shop.test", "s1")
    # Open and click tracking put per-message tokens in the body: off, to compare the rest.
    api = Api(tmp_path, **delivering(dns_server, dest.port),
              dkim={"keys": [{"domain": "shop.test", "selector": "s1",
                              "key_file": key.config.key_file}]},
              tracking={"opens": False, "clicks": False})
    text, html = "Dear Ann,\nyour code is A1.\n" + "x" * 120 + "\n", "<p>Grüße, Ann: A1</p>\n"
    smtp_copy = reference_bytes(Parts(
        Mailbox("news@shop.test", "Shop"), Mailbox("ann@dest.test", "Ann"), "Grüße Ann",
        (("X-Campaign-ID", "spring"), ("X-Extra", "1")), text, html,
        (Attachment.make("a.pdf", "application/pdf", PDF),)),
        (("Date", "Sun, 06 Dec 2026 10:00:00 +0000"), ("Message-ID", "<smtp.1@shop.test>")))
    try:
        assert api.smtp_reply("ann@dest.test", smtp_copy) == ""
        assert wait_until(lambda: len(dest.received) == 1, timeout=20)
        status, reply = api.post(spring(
            [{"email": "ann@dest.test", "name": "Ann", "substitutions": {"code": "A1"}}],
            subject="Grüße {{ name }}",
            text_body="Dear {{ name }},\nyour code is {{ code }}.\n{{ 'x' * 120 }}\n",
            html_body="<p>Grüße, {{ name }}: {{ code }}</p>\n", headers={"X-Extra": "1"},
            attachments=[{"file_name": "a.pdf", "content_type": "application/pdf",
                          "base64": True, "data": base64.b64encode(PDF).decode()}]))
        assert (status, reply["success_count"]) == (200, 1), reply
        assert wait_until(lambda: len(dest.received) == 2, timeout=20)
    finally:
        api.engine.stop()
    over_smtp, over_api = (m.data for m in dest.received)
    assert b"with ESMTP id" in over_smtp and b"with HTTPA id" in over_api
    for data in (over_smtp, over_api):
        assert dkimpy_results(data, [key.record]) == {("shop.test", "s1"): "pass"}
    (smtp_rest, smtp_dropped), (api_rest, api_dropped) = map(without_trace,
                                                            (over_smtp, over_api))
    assert smtp_dropped == api_dropped == TRACE_FIELDS
    assert api_rest == smtp_rest
    assert b"List-Unsubscribe: <" in api_rest and b"Email Marketing by" in api_rest


# --- the SMTP path's refusals ------------------------------------------------------------------


def test_suppressed_and_paused_fail_with_smtp_replies_and_the_rest_is_delivered(
        tmp_path: Path, dns_server: Any, route: Any) -> None:
    dest = route("dest.test", "127.0.0.2")
    api = Api(tmp_path, **delivering(dns_server, dest.port))
    paused = (b"From: news@shop.test\r\nTo: x@dest.test\r\nX-Campaign-ID: spring\r\n"
              b"Subject: probe\r\n\r\nprobe\r\n")
    try:
        api.admin("suppression/shop", {"address": "gone@dest.test", "reason": "unsubscribe"})
        api.admin("campaigns/shop/spring/pause", {"reason": "checking the list"})
        assert wait_until(lambda: api.smtp_reply("gone@dest.test", b"Subject: x\r\n\r\nx\r\n")
                          and api.smtp_reply("x@dest.test", paused), timeout=5)
        suppressed_reply = api.smtp_reply("gone@dest.test", b"Subject: x\r\n\r\nx\r\n")
        paused_reply = api.smtp_reply("x@dest.test", paused)
        rcpts = [{"email": e, "substitutions": {"code": "1"}}
                 for e in ("a@dest.test", "gone@dest.test", "b@dest.test")]
        summer = spring(rcpts) | {"campaign": "summer"}
        assert api.post(summer) == (200, {
            "success_count": 2, "fail_count": 1, "failed_recipients": ["gone@dest.test"],
            "errors": [suppressed_reply]})
        assert api.post(spring(rcpts[:1])) == (200, {
            "success_count": 0, "fail_count": 1, "failed_recipients": ["a@dest.test"],
            "errors": [paused_reply]})
        assert wait_until(lambda: len(dest.received) == 2, timeout=20)
    finally:
        api.engine.stop()
    assert suppressed_reply.startswith("550 5.7.1 <gone@dest.test> is on the suppression list")
    assert paused_reply.startswith("550 5.7.1 Campaign spring of account shop is paused")
    assert sorted(r for m in dest.received for r in m.rcpt_tos) == ["a@dest.test",
                                                                     "b@dest.test"]


# --- bad input ---------------------------------------------------------------------------------

GOOD = spring([{"email": "a@dest.test", "substitutions": {"code": "1"}}])
BAD_INPUT = [
    ("malformed JSON", b'{"recipients": [', BEARER, 400, "not valid JSON"),
    ("missing field", {k: v for k, v in GOOD.items() if k != "content"}, BEARER, 400,
     "content: missing"),
    ("template syntax", spring(GOOD["recipients"], text_body="a\n{% if %}"), BEARER, 422,
     "content.text_body, line 2: syntax error"),
    ("undefined variable", spring(GOOD["recipients"], subject="{{ coupon }}"), BEARER, 422,
     "content.subject, line 1: undefined: 'coupon' is undefined"),
    ("sandbox escape", spring(GOOD["recipients"], text_body="{{ ''.__class__ }}"), BEARER, 422,
     "refused by the sandbox"),
    ("header injection", spring([{"email": "a@dest.test", "substitutions": {
        "code": "1\r\nBcc: victim@else.test"}}], headers={"X-Code": "{{ code }}"}), BEARER,
     422, "content.headers.X-Code: the rendered value holds CR, LF or NUL"),
    ("too many recipients", spring([{"email": f"u{i}@dest.test", "substitutions": {
        "code": "1"}} for i in range(51)]), BEARER, 413, "at most 50 per request"),
    ("message too large", spring(GOOD["recipients"], text_body="{{ 'y' * 70000 }}"), BEARER,
     413, "[smtp] max_message_size"),
    ("request too large", spring(GOOD["recipients"], html_body="z" * 300_000), BEARER, 413,
     "[inject] max_request_size"),
    ("no credentials", GOOD, {}, 401, "authenticate as an account"),
    ("the admin token", GOOD, {"Authorization": f"Bearer {ADMIN}"}, 401, "failed"),
    ("a wrong password", GOOD, {"Authorization": "Basic " + base64.b64encode(
        b"shop:wrong").decode()}, 401, "failed"),
]


def test_bad_input_gets_its_status_and_nothing_is_spooled(tmp_path: Path) -> None:
    api = Api(tmp_path, inject={"max_recipients": 50, "max_request_size": 200_000},
              smtp={"max_message_size": 65_536})
    try:
        for name, body, headers, status, message in BAD_INPUT:
            got, reply = api.post(body, headers)
            assert (got, message in reply.get("error", "")) == (status, True), (name, reply)
        assert spooled_ids(tmp_path / "spool") == set()
        basic = {"Authorization": "Basic " + base64.b64encode(
            f"shop:{PASSWORD}".encode()).decode()}
        assert api.post(GOOD, basic)[0] == 200  # the same engine takes a good request
        for _ in range(3):  # 2 failures above (admin token, password): the limit is 5
            assert api.post(GOOD, {"Authorization": f"Bearer {ADMIN}"})[0] == 401
        assert api.post(GOOD)[0] == 429  # even with a valid key, as SMTP AUTH
    finally:
        api.engine.stop()
    assert len(spooled_ids(tmp_path / "spool")) == 1
    assert len(read_events(tmp_path / "events.jsonl", "Reception")) == 1
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    inject = [(r["identity"], r["result"]) for r in audit if r.get("channel") == "inject"]
    assert ("shop", "ok") in inject and ("shop", "failed") in inject
    assert ("api-key", "failed") in inject


def test_new_api_key_prints_the_key_once_and_the_config_line(tmp_path: Path) -> None:
    config = tmp_path / "mta.toml"
    config.write_text(f'[[accounts]]\nname = "shop"\napi_key_hashes = ["{api_key_hash(KEY)}"]\n')
    run = subprocess.run([sys.executable, "-m", "mta", "account", "new-api-key", "shop",
                          "--config", str(config)], capture_output=True, text=True,
                         timeout=60, cwd=PROJECT_ROOT, check=True)
    key = re.search(r"^  (mta_\S+)$", run.stdout, re.M)[1]
    line = re.search(r"^  (api_key_hashes = .*)$", run.stdout, re.M)[1]
    assert tomllib.loads(line)["api_key_hashes"] == [api_key_hash(KEY), api_key_hash(key)]
    assert key not in line and run.stdout.count(key) == 1
    config.write_text(f'[[accounts]]\nname = "shop"\n{line}\n')
    assert ApiKeys(load_config(config).accounts).account(key.encode()) == "shop"
