"""Relay and authentication abuse (issue 10, "Relay and authentication").

Open-relay probes from an untrusted loopback address, the RFC 5321 path parser
that splits them, AUTH in plain text, repeated AUTH failures (slowed, then
refused per address, alike for unknown and known users), accounts sending as
another account's domain (envelope and From:), and header injection through
config values.
"""

from __future__ import annotations

import base64
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w

from bench.engine_proc import read_events
from mta.address import AddressError, parse_path
from mta.config import ConfigError, load_config
from mta.smtp.auth import hash_password
from tests.helpers.abuse import (
    body_of,
    engine_log,
    new_messages,
    replies,
    self_signed_cert,
    starttls,
)
from tests.helpers.engine import RawSmtp, spooled_ids, start_engine, wait_until

UNTRUSTED = "127.0.0.2"
PLAIN_TEXT_IP = "127.0.0.3"  # untrusted, used only by the plain-text AUTH test
# Trusted (AUTH without TLS allowed), one address per test so failure counts stay apart.
KNOWN_IP, UNKNOWN_IP, BYSTANDER_IP = "127.0.1.6", "127.0.1.7", "127.0.1.8"
LOGIN_IPS = ("127.0.1.9", "127.0.1.10")
WITNESS_IP = "127.0.1.11"
PARALLEL_IP, SLOW_IP, HANG_UP_IP = "127.0.1.12", "127.0.1.13", "127.0.1.14"
MAX_FAILURES = 3
WINDOW = 4.0
MSG = b"From: a@shop.test\r\nTo: b@dest.test\r\nSubject: t\r\n\r\nhello\r\n"


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("relay")
    cert, key = self_signed_cert(tmp)
    accounts = [
        {"name": "shop", "password_hash": hash_password("shop-pw", log_n=10),
         "sender_domains": ["shop.test"]},
        {"name": "brand", "password_hash": hash_password("brand-pw", log_n=10),
         "sender_domains": ["brand.test"]},
        {"name": "other", "password_hash": hash_password("other-pw", log_n=10)},
        {"name": "slow", "password_hash": hash_password("slow-pw", log_n=15)},
    ]
    proc = start_engine(tmp, smtp={
        "trusted_networks": ["127.0.0.1/32", "127.0.1.0/24"],
        "local_domains": ["inbound.test"], "greet_pause": 0.0, "idle_timeout": 10.0,
        "max_auth_failures": MAX_FAILURES, "auth_failure_window": WINDOW,
        "tls_cert": str(cert), "tls_key": str(key)}, accounts=accounts)
    yield proc, tmp
    proc.stop()
    log = engine_log(tmp)
    assert "Traceback" not in log, log[-3000:]


def session(engine, source: str | None = None) -> RawSmtp:
    proc, _ = engine
    c = RawSmtp(proc.host, proc.port, source=source)
    c.greet()
    return c


# --- open relay ------------------------------------------------------------------------------

RELAY_PROBES = [
    "<victim@dest.test>", "<victim@DEST.TEST>", "<victim@dest.test.>",
    "<victim@inbound.test.dest.test>", "<victim@[192.0.2.1]>", "<victim@[IPv6:2001:db8::1]>",
    # percent hack
    "<victim%dest.test@inbound.test>", "<victim%dest.test@[127.0.0.1]>",
    "<victim%dest.test%inbound.test@inbound.test>", "<victim%dest.test@mta.localhost>",
    # bang paths
    "<dest.test!victim@inbound.test>", "<dest.test!victim@[127.0.0.1]>", "<dest.test!victim>",
    "<inbound.test!dest.test!victim@inbound.test>",
    # source routes: the route is ignored, the real domain decides
    "<@inbound.test:victim@dest.test>", "<@inbound.test,@mta.localhost:victim@dest.test>",
    "<@[127.0.0.1]:victim@dest.test>",
    # quoted local parts holding a route
    '<"victim@dest.test"@inbound.test>', '<"victim@dest.test"@[127.0.0.1]>',
    '<"victim%dest.test"@inbound.test>', '<"dest.test!victim"@inbound.test>',
    '<"victim\\@dest.test"@inbound.test>', '<"victim@dest.test">',
    # several @
    "<victim@dest.test@[127.0.0.1]>", "<victim@dest.test@inbound.test>",
    "<victim@inbound.test@dest.test>", "<victim@@dest.test>",
    # not paths at all
    "victim@dest.test", "<victim@dest.test", "<<victim@dest.test>>", "<victim@dest.test>>",
    "<victim@dest.test> <x@inbound.test>", "<victim @dest.test>", "<victim@dest .test>",
]


@pytest.mark.parametrize("probe", RELAY_PROBES)
def test_open_relay_probe_from_untrusted_address_is_refused(engine, probe: str) -> None:
    _, tmp = engine
    before = spooled_ids(tmp / "spool")
    c = session(engine, source=UNTRUSTED)
    assert c.cmd("MAIL FROM:<probe@remote.test>")[0] == 250
    code, text = c.cmd(f"RCPT TO:{probe}")
    assert code in (501, 550, 553) and text.startswith("5."), (probe, code, text)
    if code == 550:
        assert text.startswith("5.7.1"), text
    # The control: a plain local recipient is taken, so the refusal above was about
    # the probe, and the probe added no recipient.
    assert c.cmd("RCPT TO:<postmaster@inbound.test>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    assert c.cmd(b"Subject: probe\r\n\r\nx\r\n.\r\n")[0] == 250
    c.close()
    (stored,) = new_messages(tmp / "spool", before)
    assert stored["rcpts"] == ["postmaster@inbound.test"]


def test_untrusted_client_probing_in_one_session_is_cut_off(engine) -> None:
    """After `max_errors` (20) refusals an untrusted, unauthenticated session ends with
    421; a trusted client meeting as many refusals keeps its session."""
    c = session(engine, source=UNTRUSTED)
    assert c.cmd("MAIL FROM:<probe@remote.test>")[0] == 250
    codes = [c.cmd(f"RCPT TO:<victim{i}@dest.test>")[0] for i in range(20)]
    assert codes == [550] * 20
    code, text = c.reply()  # right after the 20th refusal
    assert code == 421 and text.startswith("4.7.0") and c.closed()
    trusted = session(engine)
    assert trusted.cmd("MAIL FROM:<a@shop.test>")[0] == 250
    assert all(trusted.cmd("RCPT TO:<bad@@x>")[0] // 100 == 5 for _ in range(25))
    assert trusted.cmd("NOOP")[0] == 250
    trusted.close()


def test_trusted_client_may_relay_the_same_probes(engine) -> None:
    """The refusals are relay control, not broken parsing: a trusted client relays."""
    c = session(engine)
    assert c.cmd("MAIL FROM:<a@shop.test>")[0] == 250
    for probe in ["<victim@dest.test>", "<victim%dest.test@inbound.test>",
                  '<"victim@dest.test"@inbound.test>', "<@inbound.test:victim@dest.test>"]:
        assert c.cmd(f"RCPT TO:{probe}")[0] == 250, probe
    c.close()


PARSED = [
    ("<user@example.com>", "user", "example.com"),
    ("<User.Name+tag@Example.COM>", "User.Name+tag", "example.com"),
    ("<@relay.test:user@example.com>", "user", "example.com"),
    ("<@a.test,@b.test:user@example.com>", "user", "example.com"),
    ('<"user@elsewhere"@example.com>', '"user@elsewhere"', "example.com"),
    ('<"a\\"b@c"@example.com>', '"a\\"b@c"', "example.com"),
    ('<"a>b"@example.com>', '"a>b"', "example.com"),
    ("<user%elsewhere@example.com>", "user%elsewhere", "example.com"),
    ("<host!user@example.com>", "host!user", "example.com"),
    ("<user@[192.0.2.1]>", "user", "[192.0.2.1]"),
    ("<user@[IPv6:2001:db8::1]>", "user", "[ipv6:2001:db8::1]"),
    ("<josé@exämple.com>", "josé", "exämple.com"),
    ("<>", "", ""),
]


@pytest.mark.parametrize("text,local,domain", PARSED)
def test_parser_splits_paths(text: str, local: str, domain: str) -> None:
    address, params = parse_path(text, allow_null=True)
    assert (address.local, address.domain, params) == (local, domain, {})


REFUSED = [
    "user@example.com", "<user@example.com.>", "<user@example.com", "<user@example.com>x", "<user@@example.com>",
    "<user@example.com@[192.0.2.1]>", "<u@d@[192.0.2.1]>", "<@relay.test:>", "<user>",
    "<user@>", "<@example.com>", "<user@example..com>", "<user@-example.com>",
    "<user@[192.0.2.300]>", "<user@[IPv6:zz]>", "<user@[example.com]>", '<"unclosed@example.com>',
    "<us er@example.com>", "<user.@example.com>", "<.user@example.com>", "<a..b@example.com>",
    "<user@exa mple.com>", "<user\x00@example.com>", "<user@example.com\r>",
    "<" + "a" * 65 + "@example.com>", "<a@" + ("b" * 60 + ".") * 5 + "com>",
    "<user@example.com> SIZE=1 SIZE=2", "<user@example.com> =1", "<user@example.com> X=a=\x01",
    "<user@example.com> X=\udcff", "<\udcff@example.com>",
]


@pytest.mark.parametrize("text", REFUSED)
def test_parser_refuses_with_an_smtp_reply(text: str) -> None:
    with pytest.raises(AddressError) as refused:
        parse_path(text)
    reply = refused.value.reply
    assert reply[:3] in ("501", "553", "555") and reply[4:6] == "5.", reply


def test_parser_reads_parameters() -> None:
    address, params = parse_path("<a@b.test> SIZE=100 BODY=8BITMIME SMTPUTF8")
    assert str(address) == "a@b.test"
    assert params == {"SIZE": "100", "BODY": "8BITMIME", "SMTPUTF8": None}


# --- AUTH ------------------------------------------------------------------------------------


def auth_events(tmp: Path) -> list[dict]:
    return read_events(tmp / "events.jsonl", "Auth")


def test_auth_in_plain_text_from_untrusted_is_refused_and_never_checked(engine) -> None:
    _, tmp = engine
    c = session(engine, source=PLAIN_TEXT_IP)
    code, text = c.cmd("EHLO client.test")
    assert "AUTH PLAIN LOGIN" not in text.splitlines()
    for line in [f"AUTH PLAIN {plain('shop', 'shop-pw')}", "AUTH LOGIN", "AUTH PLAIN"]:
        code, text = c.cmd(line)
        assert code == 538 and text.startswith("5.7.11"), (line, text)
    # Nothing was authenticated: the session still may not relay.
    assert c.cmd("MAIL FROM:<a@shop.test>")[0] == 250
    code, text = c.cmd("RCPT TO:<b@dest.test>")
    assert code == 550 and text.startswith("5.7.1")
    c.close()
    # A checked login (from a trusted address) shows up in the event log; the refused
    # ones above never reached the password check, so they left no event.
    witness = session(engine, source=WITNESS_IP)
    assert witness.cmd(f"AUTH PLAIN {plain('other', 'other-pw')}")[0] == 235
    witness.close()
    assert wait_until(lambda: any(e.get("client") == WITNESS_IP for e in auth_events(tmp)))
    assert not [e for e in auth_events(tmp) if e.get("client") == PLAIN_TEXT_IP]


def test_auth_over_starttls_from_untrusted_works(engine) -> None:
    c = session(engine, source=UNTRUSTED)
    assert c.cmd("STARTTLS")[0] == 220
    starttls(c)
    code, text = c.cmd("EHLO client.test")
    assert "AUTH PLAIN LOGIN" in text.splitlines()
    code, text = c.cmd(f"AUTH PLAIN {plain('shop', 'shop-pw')}")
    assert code == 235 and text.startswith("2.7.0")
    assert c.cmd("MAIL FROM:<a@shop.test>")[0] == 250
    assert c.cmd("RCPT TO:<b@dest.test>")[0] == 250  # authenticated: may relay
    c.close()


def _auth_attempt(c: RawSmtp, user: str, password: str) -> tuple[int, str, float]:
    started = time.monotonic()
    code, text = c.cmd(f"AUTH PLAIN {plain(user, password)}")
    return code, text, time.monotonic() - started


def test_failed_auth_slowed_then_refused_per_address_alike_for_unknown_users(engine) -> None:
    known = session(engine, source=KNOWN_IP)
    unknown = session(engine, source=UNKNOWN_IP)
    timings: list[tuple[float, float]] = []
    for attempt in range(MAX_FAILURES):
        k_code, k_text, k_time = _auth_attempt(known, "shop", "wrong")
        u_code, u_text, u_time = _auth_attempt(unknown, "nobody", "wrong")
        assert (k_code, k_text) == (u_code, u_text) == (535, "5.7.8 Authentication credentials "
                                                             "invalid")
        timings.append((k_time, u_time))
        expected_delay = 0.25 * attempt  # slowed more with each failure
        assert min(k_time, u_time) >= expected_delay - 0.02, timings
        assert abs(k_time - u_time) < 0.15, timings
    last_failure = time.monotonic()
    # Past the limit: refused outright, the same way, and the connection is closed.
    for c in (known, unknown):
        code, text = c.cmd(f"AUTH PLAIN {plain('shop', 'shop-pw')}")
        assert code == 421 and text.startswith("4.7.0")
        assert c.closed()
    # A new connection from a locked-out address: refused even with the right password.
    again = session(engine, source=KNOWN_IP)
    assert again.cmd(f"AUTH PLAIN {plain('shop', 'shop-pw')}")[0] == 421
    # Another address is not affected.
    bystander = session(engine, source=BYSTANDER_IP)
    code, _, took = _auth_attempt(bystander, "shop", "shop-pw")
    assert code == 235 and took < 0.5
    bystander.close()
    # Once the failures are older than the window, the address may try again.
    time.sleep(max(0.0, last_failure + WINDOW + 0.2 - time.monotonic()))
    later = session(engine, source=KNOWN_IP)
    assert later.cmd(f"AUTH PLAIN {plain('shop', 'shop-pw')}")[0] == 235
    later.close()


def test_parallel_auth_attempts_cannot_exceed_the_failure_limit(engine) -> None:
    """Once an address has failed, its attempts in progress count toward the limit: ten
    connections guessing at the same moment get no more than the limit's worth of tries."""
    _, tmp = engine
    first = session(engine, source=PARALLEL_IP)
    assert first.cmd(f"AUTH PLAIN {plain('shop', 'guess-0')}")[0] == 535
    first.close()
    conns = [session(engine, source=PARALLEL_IP) for _ in range(10)]
    for i, c in enumerate(conns):
        c.send(f"AUTH PLAIN {plain('shop', f'guess-{i + 1}')}\r\n".encode())
    codes = sorted(c.reply()[0] for c in conns)
    for c in conns:
        c.close()
    assert codes.count(535) <= MAX_FAILURES - 1 and codes.count(421) >= 10 - (MAX_FAILURES - 1)
    assert set(codes) <= {535, 421}, codes
    time.sleep(0.3)
    checked = [e for e in auth_events(tmp) if e.get("client") == PARALLEL_IP]
    assert len(checked) <= MAX_FAILURES, checked


def test_password_check_does_not_stall_other_sessions(engine) -> None:
    """scrypt (here log_n=15) runs off the event loop: another session's NOOPs are answered
    promptly while a password is being checked."""
    import threading

    pinger = session(engine)
    latencies: list[float] = []
    done = threading.Event()

    def ping() -> None:
        while not done.is_set():
            started = time.monotonic()
            assert pinger.cmd("NOOP")[0] == 250
            latencies.append(time.monotonic() - started)
            time.sleep(0.005)

    thread = threading.Thread(target=ping)
    slow = session(engine, source=SLOW_IP)
    thread.start()
    try:
        time.sleep(0.05)
        code, _, took = _auth_attempt(slow, "slow", "wrong")
    finally:
        done.set()
        thread.join(10)
    slow.close()
    pinger.close()
    assert code == 535 and took > 0.05
    assert len(latencies) >= 3 and max(latencies) < took / 2, (took, max(latencies))


def test_failure_counts_even_when_the_client_hangs_up_during_the_check(engine) -> None:
    _, tmp = engine
    c = session(engine, source=HANG_UP_IP)
    c.send(f"AUTH PLAIN {plain('slow', 'guess')}\r\n".encode())
    time.sleep(0.02)
    c.close()  # before the (slow) check is over: no reply to wait for
    assert wait_until(lambda: any(e.get("client") == HANG_UP_IP and e["ok"] is False
                                  for e in auth_events(tmp)))
    again = session(engine, source=HANG_UP_IP)
    code, _, took = _auth_attempt(again, "nobody", "x")
    assert code == 535 and took >= 0.25 - 0.02  # slowed: the first failure was counted
    again.close()


def test_auth_login_failure_replies_match_for_unknown_and_known(engine) -> None:
    replies_seen = set()
    for user, ip in zip(("other", "no-such-user"), LOGIN_IPS, strict=True):
        c = session(engine, source=ip)
        assert c.cmd("AUTH LOGIN")[0] == 334
        assert c.cmd(base64.b64encode(user.encode()).decode())[0] == 334
        replies_seen.add(c.cmd(base64.b64encode(b"bad").decode()))
        c.close()
    assert replies_seen == {(535, "5.7.8 Authentication credentials invalid")}


# --- accounts and sender domains ---------------------------------------------------------------


def authed(engine, user: str, password: str) -> RawSmtp:
    c = session(engine)
    assert c.cmd(f"AUTH PLAIN {plain(user, password)}")[0] == 235
    return c


@pytest.mark.parametrize("user,password,sender", [
    ("other", "other-pw", "ceo@shop.test"),       # no list of its own: not others' domains
    ("other", "other-pw", "ceo@news.shop.test"),  # nor their subdomains
    ("other", "other-pw", "ceo@SHOP.test"),
    ("other", "other-pw", "ceo@brand.test"),
    ("shop", "shop-pw", "ceo@brand.test"),        # a list: only those domains
    ("shop", "shop-pw", "ceo@anything.test"),
    ("brand", "brand-pw", "ceo@shop.test"),
])
def test_account_may_not_use_another_accounts_sender_domain(engine, user: str, password: str,
                                                            sender: str) -> None:
    c = authed(engine, user, password)
    code, text = c.cmd(f"MAIL FROM:<{sender}>")
    assert code == 553 and text.startswith("5.7.1"), text
    c.close()


@pytest.mark.parametrize("from_field", [
    b"From: ceo@shop.test",
    b"From: CEO <ceo@SHOP.TEST.>",
    b'From: "ok@other.test" <ceo@shop.test>',
    b"From: a@other.test, ceo@shop.test",
    b"From: CEO\r\n <ceo@shop.test>",
    b"From: =?utf-8?q?CEO?= <ceo@news.shop.test>",
    b"From: a@other.test\r\nFrom: ceo@shop.test",
    b"FROM:ceo@shop.test",
])
def test_from_header_of_another_accounts_domain_is_refused(engine, from_field: bytes) -> None:
    """The DKIM signer picks its key by the From: domain: an account must not get its mail
    signed as another account's domain by putting that domain in From:."""
    _, tmp = engine
    before = spooled_ids(tmp / "spool")
    c = authed(engine, "other", "other-pw")
    c.send(b"MAIL FROM:<bounce@other.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n"
           + from_field + b"\r\nSubject: spoof\r\n\r\nx\r\n.\r\n")
    got = replies(c, 4)
    assert [r[0] for r in got[:3]] == [250, 250, 354]
    assert got[3][0] == 550 and got[3][1].startswith("5.7.1"), got[3]
    c.close()
    assert spooled_ids(tmp / "spool") == before


def test_accounts_send_as_their_own_domains(engine) -> None:
    _, tmp = engine
    before = spooled_ids(tmp / "spool")
    for user, password, sender in [("shop", "shop-pw", "a@shop.test"),
                                   ("other", "other-pw", "a@other.test"),
                                   ("brand", "brand-pw", "a@brand.test")]:
        c = authed(engine, user, password)
        body = f"From: News <{sender}>\r\nSubject: own\r\n\r\nhi\r\n".encode()
        c.send(f"MAIL FROM:<{sender}>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n".encode()
               + body + b".\r\n")
        assert [r[0] for r in replies(c, 4)] == [250, 250, 354, 250], user
        c.close()
    # The trusted network (the operator's own apps) is not bound by the accounts' claims.
    c = session(engine)
    c.send(b"MAIL FROM:<a@shop.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n" + MSG + b".\r\n")
    assert [r[0] for r in replies(c, 4)] == [250, 250, 354, 250]
    c.close()
    new = new_messages(tmp / "spool", before)
    assert sorted(m["account"] for m in new) == ["brand", "default", "other", "shop"]


# --- header injection ----------------------------------------------------------------------------

INJECTED = ["\r\nBcc: victim@dest.test", "\nX-Injected: 1", "a\rb", "a\0b"]
HEADER_KEYS = [
    ({"engine": {"hostname": "mta.example{}"}}, "[engine] hostname"),
    ({"smtp": {"campaign_header": "X-Campaign{}"}}, "[smtp] campaign_header"),
    ({"smtp": {"trusted_account": "default{}"}}, "[smtp] trusted_account"),
    ({"smtp": {"local_domains": ["ok.test", "in{}.test"]}}, "[smtp] local_domains"),
    ({"delivery": {"helo_name": "mx.example{}"}}, "[delivery] helo_name"),
    ({"bounce": {"domain": "bounces.example{}"}}, "[bounce] domain"),
    ({"bounce": {"verp_prefix": "b{}"}}, "[bounce] verp_prefix"),
    ({"http": {"public_url": "https://example.test/{}"}}, "[http] public_url"),
    ({"accounts": [{"name": "shop", "email": "ops@shop.test{}"}]}, "[accounts][0] email"),
    ({"accounts": [{"name": "sh{}op"}]}, "[accounts][0] name"),
    ({"accounts": [{"name": "shop", "sender_domains": ["shop{}.test"]}]},
     "[accounts][0] sender_domains"),
    ({"dkim": {"keys": [{"domain": "example.test", "selector": "s1{}", "key_file": "k"}]}},
     "selector"),
]


def _fill(template: object, text: str) -> object:
    if isinstance(template, str):
        return template.replace("{}", text)
    if isinstance(template, list):
        return [_fill(x, text) for x in template]
    if isinstance(template, dict):
        return {k: _fill(v, text) for k, v in template.items()}
    return template


@pytest.mark.parametrize("template,named", HEADER_KEYS, ids=[n for _, n in HEADER_KEYS])
@pytest.mark.parametrize("injected", INJECTED, ids=["crlf", "lf", "cr", "nul"])
def test_cr_lf_nul_in_header_bound_config_values_refused(tmp_path: Path, template: dict,
                                                         named: str, injected: str) -> None:
    path = tmp_path / "mta.toml"
    path.write_text(tomli_w.dumps(_fill(template, injected)))
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    message = str(refused.value)
    assert named in message and "\n" not in message and "\r" not in message, message
    path.write_text(tomli_w.dumps(_fill(template, "")))
    load_config(path)  # the same value without the injection loads


@pytest.mark.parametrize("section,key,value", [
    ("engine", "hostname", "mta example"), ("engine", "hostname", "mta.example>"),
    ("smtp", "campaign_header", "X-Campaign: 1"), ("smtp", "campaign_header", "X Campaign"),
    ("delivery", "helo_name", "a b"), ("bounce", "domain", "bounces@example"),
    ("bounce", "verp_prefix", "b c"), ("http", "public_url", "javascript:alert(1)"),
    ("http", "public_url", "https://x.test/a b"),
])
def test_header_bound_config_values_must_have_their_syntax(tmp_path: Path, section: str,
                                                           key: str, value: str) -> None:
    path = tmp_path / "mta.toml"
    path.write_text(tomli_w.dumps({section: {key: value}}))
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert f"[{section}] {key}" in str(refused.value)


def test_injection_in_config_stops_mta_serve_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "mta.toml"
    path.write_text(tomli_w.dumps({"engine": {"hostname": "mta.test\r\nBcc: x@dest.test"}}))
    result = subprocess.run([sys.executable, "-m", "mta", "serve", "--config", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "[engine] hostname" in lines[0], result.stderr


def test_received_field_holds_no_client_controlled_line_breaks(engine) -> None:
    """The EHLO name goes into Received:; whatever the client sends there stays on its line."""
    _, tmp = engine
    before = spooled_ids(tmp / "spool")
    proc, _ = engine
    c = RawSmtp(proc.host, proc.port)
    assert c.reply()[0] == 220
    assert c.cmd(b"EHLO evil\rBcc: victim@dest.test\x00\x0b\xff\r\n")[0] == 250
    c.send(b"MAIL FROM:<a@shop.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n"
           + b"X-Campaign-ID: spring\r\n\tsale\r\n" + MSG + b".\r\n")
    assert [r[0] for r in replies(c, 4)] == [250, 250, 354, 250]
    c.close()
    (stored,) = new_messages(tmp / "spool", before)
    received = stored["data"][: stored["data"].index(b"X-Campaign-ID")]
    assert received.startswith(b"Received: from evil?Bcc:?victim@dest.test")
    assert b"\rB" not in received and b"\0" not in received and b"\x0b" not in received
    assert received.count(b"\r") == received.count(b"\r\n") == received.count(b"\n")
    for line in received.split(b"\r\n")[1:-1]:
        assert line.startswith(b"\t"), line  # continuation lines only
    assert stored["campaign"] == "spring sale"
    assert body_of(stored) == b"X-Campaign-ID: spring\r\n\tsale\r\n" + MSG
