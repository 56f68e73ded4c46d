"""The SMTP server loop under fuzzing, against a real `mta serve` on loopback (issue 10).

Random command streams (real verbs with hostile arguments, raw bytes, every kind of
line end) go to the engine in one or a few packets. Whatever it gets, every reply is a
well-formed SMTP reply line, no exception escapes a session (no 451 "internal error",
no traceback in the log), the session ends in step (a trailing NOOP is answered, or the
engine hung up on purpose), and the engine keeps serving. Random clean messages, dot
lines and all, are stored byte for byte; random campaign names, hostile characters and
all, are stored whole or refused.
"""

from __future__ import annotations

import os
import re
import socket
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mta.text import name_problem
from tests.helpers.abuse import body_of, engine_log, new_messages
from tests.helpers.engine import RawSmtp, spooled_ids, start_engine
from tests.test_fuzz_parsers import name_piece

FUZZ_EXAMPLES = int(os.environ.get("MTA_FUZZ_EXAMPLES", "150"))
live = settings(max_examples=FUZZ_EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
REPLY_LINE = re.compile(rb"[2-5]\d\d[ -][^\r\n]*\r\n")
SENTINEL = b"\r\n.\r\nRSET\r\nNOOP fuzz-end\r\n"
# Replies after which the engine hangs up on purpose.
HANG_UPS = (b"221 ", b"421 ", b"521 ", b"554 5.5.1 Protocol")


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("fuzz")
    from mta.smtp.auth import hash_password

    proc = start_engine(tmp, smtp={
        "trusted_networks": ["127.0.0.1/32"], "local_domains": ["inbound.test"],
        "max_message_size": 20_000, "max_command_line": 512, "max_recipients": 100,
        "idle_timeout": 5.0, "data_timeout": 5.0, "max_unknown_commands": 4,
        "greet_pause": 0.0, "max_auth_failures": 1000, "auth_failure_window": 0.2},
        accounts=[{"name": "shop", "password_hash": hash_password("pw", log_n=4)}])
    yield proc, tmp
    proc.stop()
    log = engine_log(tmp)
    assert "Traceback" not in log and "SMTP session error" not in log, log[-3000:]


verbs = st.sampled_from([
    b"EHLO", b"HELO", b"MAIL FROM:", b"RCPT TO:", b"DATA", b"RSET", b"NOOP", b"QUIT", b"VRFY",
    b"EXPN", b"HELP", b"AUTH", b"AUTH PLAIN", b"AUTH LOGIN", b"STARTTLS", b"BDAT", b"ehlo",
    b"mail from:", b"MAIL", b"RCPT", b"", b".", b"..",
])
args = st.sampled_from([
    b"", b" ", b"<a@shop.test>", b"<b@dest.test>", b"<postmaster>", b"<>", b" client.test",
    b"<a@inbound.test> SIZE=10", b" SIZE=99999999999", b"<x@[127.0.0.1]>", b"<\"a b\"@inbound.test>",
    b"<a%b@inbound.test>", b"<@r.test:a@inbound.test>", b" AHNob3AAcHc=", b" AGEAYg==", b"*",
    b"<a@inbound.test> BODY=8BITMIME SMTPUTF8", b"<\xc3\xa9@inbound.test> SMTPUTF8", b"\xff\xfe",
    b"\x00", b"\x1b[0m", b"x" * 600, b"=?utf-8?q?x?=", b"<a@b>>", b"<<a@b>", b"\t",
    b"<anyone@mta.localhost>", b"<postmaster@MTA.localhost>", b"<x@localhost>", b"<abuse@[::1]>",
])
raw = st.binary(max_size=40)
line_end = st.sampled_from([b"\r\n"] * 8 + [b"\n", b"\r", b"", b"\r\r\n", b"\n\r"])
item = st.one_of(st.tuples(verbs, args, line_end).map(b"".join),
                 st.tuples(raw, line_end).map(b"".join))
streams = st.lists(item, min_size=1, max_size=25).map(b"".join)


def read_until_end(c: RawSmtp, deadline: float) -> tuple[bytes, bool]:
    """Everything the engine answers until the sentinel's replies (RSET's and NOOP's, then
    a quiet moment) or a hang-up."""
    data = b""
    while time.monotonic() < deadline:
        in_step = data.endswith(b"250 2.0.0 OK\r\n250 2.0.0 OK\r\n")
        c.sock.settimeout(0.2 if in_step else 0.5)
        try:
            chunk = c.sock.recv(65536)
        except TimeoutError:
            if in_step:
                return data, False
            continue
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    raise AssertionError(f"no end of session in time; got {data[-500:]!r}")


def check_session(proc, stream: bytes, packets: int) -> None:
    c = RawSmtp(proc.host, proc.port, timeout=10)
    try:
        assert c.reply()[0] == 220
        wire = stream + SENTINEL  # the sentinel rides in the last packet
        step = max(1, len(wire) // packets + 1)
        for i in range(0, len(wire), step):
            try:
                c.send(wire[i:i + step])
            except (BrokenPipeError, ConnectionResetError):
                break
            if packets > 1:
                time.sleep(0.002)
        data, hung_up = read_until_end(c, time.monotonic() + 12)
    finally:
        c.close()
    pos = 0
    while pos < len(data):
        m = REPLY_LINE.match(data, pos)
        assert m, f"malformed reply at {pos}: {data[pos:pos + 200]!r}"
        pos = m.end()
    assert b"Internal error" not in data, data
    if hung_up:  # only on purpose, with a reply saying why (or after a STARTTLS we asked)
        last = data.rstrip(b"\r\n").rsplit(b"\r\n", 1)[-1] + b" "
        assert last.startswith(HANG_UPS) or last.startswith(b"220 "), data[-300:]


@live
@given(streams, st.sampled_from([1, 1, 3]))
@example(b"STARTTLS \r\n", 1)  # refused STARTTLS (no certificate) dropped pipelined commands
@example(b"STARTTLS\r\nNOOP\r\nEHLO x\r\n", 1)
def test_random_command_streams_get_clean_replies(engine, stream: bytes, packets: int) -> None:
    proc, _ = engine
    check_session(proc, stream, packets)


@live
@given(st.lists(st.one_of(st.sampled_from([b".", b"..", b". ", b".\t", b"...", b"", b"From x",
                                           b"Subject: dot", b".\xff", b"\xe9t\xe9"]),
                          st.binary(max_size=60).map(
                              lambda b: b.replace(b"\r", b"").replace(b"\n", b"")
                              .replace(b"\0", b""))),
                max_size=30))
def test_random_clean_messages_are_stored_byte_for_byte(engine, lines: list[bytes]) -> None:
    proc, tmp = engine
    message = b"".join(line + b"\r\n" for line in lines)
    stuffed = b"".join((b"." if line.startswith(b".") else b"") + line + b"\r\n"
                       for line in lines)
    before = spooled_ids(tmp / "spool")
    c = RawSmtp(proc.host, proc.port)
    try:
        c.greet()
        c.send(b"MAIL FROM:<a@shop.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n")
        assert [c.reply()[0] for _ in range(3)] == [250, 250, 354]
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.send(stuffed + b".\r\n")
        code, text = c.reply()
    finally:
        c.close()
    assert code == 250, text
    (stored,) = new_messages(tmp / "spool", before)
    assert body_of(stored) == message


def expected_campaign(value: bytes) -> str | None:
    """The campaign a field holding `value` names, folds read as one space; None if the
    name is unfit (`name_problem`) or not UTF-8."""
    try:
        name = re.sub(rb"\r\n[ \t]+", b" ", value).strip(b" \t").decode()
    except UnicodeDecodeError:
        return None
    return None if name_problem(name) else name


# Line breaks here come as folds (CRLF and white space) or inside the name: a bare CR or
# LF refuses the whole message before its fields are read (tests/test_intake_hostile.py).
folded_names = st.lists(name_piece.filter(lambda p: p not in ("\r", "\n", "\r\n")),
                        max_size=6).map(lambda p: "".join(p).encode())


@live
@given(st.one_of(folded_names, st.binary(max_size=12).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b""))))
def test_random_campaign_names_are_stored_whole_or_refused(engine, value: bytes) -> None:
    proc, tmp = engine
    before = spooled_ids(tmp / "spool")
    c = RawSmtp(proc.host, proc.port)
    try:
        c.greet()
        c.send(b"MAIL FROM:<a@shop.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n")
        assert [c.reply()[0] for _ in range(3)] == [250, 250, 354]
        code, text = c.cmd(b"X-Campaign-ID: " + value + b"\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
    finally:
        c.close()
    name = expected_campaign(value)
    if name is None:
        assert code == 550 and text.startswith(("5.6.0 X-Campaign-ID: ", "5.5.2 ")), text
        assert spooled_ids(tmp / "spool") == before
    else:
        assert code == 250, text
        (stored,) = new_messages(tmp / "spool", before)
        assert stored["campaign"] == name


def test_engine_serves_normally_after_the_fuzzing(engine) -> None:
    proc, tmp = engine
    before = spooled_ids(tmp / "spool")
    c = RawSmtp(proc.host, proc.port)
    c.greet()
    c.send(b"MAIL FROM:<a@shop.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\nSubject: ok\r\n\r\n"
           b"fine\r\n.\r\nQUIT\r\n")
    assert [c.reply()[0] for _ in range(5)] == [250, 250, 354, 250, 221]
    c.close()
    assert len(spooled_ids(tmp / "spool") - before) == 1
