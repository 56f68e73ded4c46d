"""Protocol abuse against a real `mta serve` on loopback (issue 10, "Protocol abuse").

SMTP smuggling with pipelining and split packets, STARTTLS command injection,
over-long lines, SIZE overflow with bounded memory, recipient limits, control
characters, 8-bit data, unknown commands, pre-greeting talkers, slow-loris and
the per-address connection cap.

Policies decided here (and what the tests hold the engine to):
- A message whose data holds any end-of-data look-alike (a bare CR or LF, NUL) is
  refused whole with 550 5.5.2; the session goes on and later mail is accepted.
- Data lines longer than 1000 octets are accepted and stored byte for byte, as
  Postfix does (RFC 5321 4.5.3.1.6 limits what a sender may emit; refusing
  would lose real-world mail). Memory stays bounded by max_message_size. They are
  broken before sending (tests/test_long_lines.py).
- 8-bit data is accepted with or without BODY=8BITMIME, in EHLO and HELO sessions,
  and stored byte for byte (Postfix's default); nothing is rewritten.
- Command lines longer than max_command_line get 500 5.5.2; the session goes on.
- Untrusted clients wait `greet_pause` for the 220; one that talks first gets
  554 5.5.1 and is cut off. Trusted networks get the 220 at once.
"""

from __future__ import annotations

import re
import socket
import time

import pytest

from tests.helpers.abuse import (
    body_of,
    engine_log,
    new_messages,
    proc_status,
    replies,
    self_signed_cert,
    send_slowly,
    starttls,
    stored_messages,
)
from tests.helpers.engine import RawSmtp, spooled_ids, start_engine, wait_until

MSG = b"From: a@shop.test\r\nTo: b@dest.test\r\nSubject: legit\r\n\r\nhello\r\n"
SMUGGLING = {
    "lf.lf": b"\n.\n", "lf.cr": b"\n.\r", "cr.lf": b"\r.\n", "cr.cr": b"\r.\r",
    "lf.crlf": b"\n.\r\n", "cr.crlf": b"\r.\r\n", "crlf.lf": b"\r\n.\n", "crlf.cr": b"\r\n.\r",
    "nul.dot": b"\r\n\0.\r\n", "dot.nul": b"\r\n.\0\r\n",
}
EMBEDDED = (b"MAIL FROM:<evil@shop.test>\r\nRCPT TO:<victim@dest.test>\r\nDATA\r\n"
            b"From: ceo@shop.test\r\nSubject: smuggled\r\n\r\nevil\r\n")
IDLE = 2.0
DATA_TIMEOUT = 4.0
PAUSE = 0.3


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("abuse")
    cert, key = self_signed_cert(tmp)
    proc = start_engine(tmp, smtp={
        "trusted_networks": ["127.0.0.1/32"], "local_domains": ["inbound.test"],
        "max_message_size": 1_000_000, "max_recipients": 100, "max_command_line": 2048,
        "idle_timeout": IDLE, "data_timeout": DATA_TIMEOUT, "max_unknown_commands": 3,
        "greet_pause": PAUSE, "max_connections_per_ip": 50,
        "tls_cert": str(cert), "tls_key": str(key)})
    yield proc, tmp
    proc.stop()
    log = engine_log(tmp)
    assert "Traceback" not in log, log[-3000:]


def session(engine, source: str | None = None) -> RawSmtp:
    proc, _ = engine
    c = RawSmtp(proc.host, proc.port, source=source)
    c.greet()
    return c


# --- SMTP smuggling ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SMUGGLING))
def test_smuggling_fully_pipelined_then_legit_mail_in_same_session(engine, name: str) -> None:
    """One packet: a transaction whose data hides a fake end of data and a second
    transaction, then a legitimate transaction. The first is refused whole, nothing of the
    embedded one is spooled, and the legitimate one is stored exactly once."""
    _, tmp = engine
    before = spooled_ids(tmp / "spool")
    c = session(engine)
    c.send(b"MAIL FROM:<a@shop.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n"
           + b"Subject: smuggle\r\n\r\nhello" + SMUGGLING[name] + EMBEDDED + b"\r\n.\r\n"
           + b"MAIL FROM:<a@shop.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n"
           + MSG + b".\r\nQUIT\r\n")
    got = replies(c, 8)
    assert [code for code, _ in got] == [250, 250, 354, 550, 250, 250, 354, 250], got
    assert "5.5.2" in got[3][1]
    assert c.closed()
    new = new_messages(tmp / "spool", before)
    assert len(new) == 1
    assert new[0]["rcpts"] == ["b@dest.test"] and body_of(new[0]) == MSG
    assert b"smuggled" not in new[0]["data"] and b"evil" not in new[0]["data"]


def test_smuggling_split_at_every_byte_is_refused(engine) -> None:
    """The fake end of data arrives split over two packets at each possible point: the
    engine's search across read boundaries must still refuse every variant."""
    _, tmp = engine
    before = spooled_ids(tmp / "spool")
    c = session(engine)
    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    cases = 0
    for variant in SMUGGLING.values():
        for cut in range(1, len(variant)):
            c.send(b"MAIL FROM:<a@shop.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n")
            assert [r[0] for r in replies(c, 3)] == [250, 250, 354]
            c.send(b"Subject: split\r\n\r\nhello" + variant[:cut])
            time.sleep(0.01)
            c.send(variant[cut:] + EMBEDDED + b".\r\n")
            code, text = c.reply()
            assert code == 550 and "5.5.2" in text, (variant, cut)
            cases += 1
    assert cases == sum(len(v) - 1 for v in SMUGGLING.values())
    assert spooled_ids(tmp / "spool") == before


def test_real_end_of_data_split_at_every_byte_stores_one_exact_message(engine) -> None:
    _, tmp = engine
    before = spooled_ids(tmp / "spool")
    c = session(engine)
    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # Dot-stuffed lines, a line that is only "..", and dots mid-line must come out right.
    body = b"Subject: dots\r\n\r\n..leading dot\r\n..\r\nmid.dle\r\n...\r\nend"
    expected = b"Subject: dots\r\n\r\n.leading dot\r\n.\r\nmid.dle\r\n..\r\nend\r\n"
    end = b"\r\n.\r\n"
    for cut in range(len(end) + 1):
        c.send(b"MAIL FROM:<a@shop.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n")
        assert [r[0] for r in replies(c, 3)] == [250, 250, 354]
        c.send(body + end[:cut])
        time.sleep(0.01)
        c.send(end[cut:])
        assert c.reply()[0] == 250, cut
    new = new_messages(tmp / "spool", before)
    assert len(new) == len(end) + 1
    assert {body_of(m) for m in new} == {expected}


# --- STARTTLS ------------------------------------------------------------------------------


def test_starttls_drops_commands_pipelined_with_it(engine) -> None:
    """STARTTLS and MAIL in one packet: the MAIL must not run inside the TLS session."""
    proc, tmp = engine
    before = spooled_ids(tmp / "spool")
    c = session(engine, source="127.0.0.2")
    code, text = c.cmd("EHLO client.test")
    assert "STARTTLS" in text.splitlines() and "AUTH PLAIN LOGIN" not in text.splitlines()
    c.send(b"STARTTLS\r\nMAIL FROM:<evil@inbound.test>\r\nRCPT TO:<victim@inbound.test>\r\n")
    assert c.reply()[0] == 220
    starttls(c)
    # The first reply inside TLS must be the one to our EHLO, not to an injected command.
    code, text = c.cmd("EHLO client.test")
    assert code == 250 and text.splitlines()[0] == "mta.localhost", text
    assert "AUTH PLAIN LOGIN" in text.splitlines() and "STARTTLS" not in text.splitlines()
    code, text = c.cmd("RCPT TO:<victim@inbound.test>")
    assert code == 503 and "5.5.1" in text  # no MAIL carried over
    assert c.cmd("DATA")[0] == 503
    code, text = c.cmd("STARTTLS")
    assert code == 503  # only once
    # The TLS session itself works.
    assert c.cmd("MAIL FROM:<a@remote.test>")[0] == 250
    assert c.cmd("RCPT TO:<postmaster@inbound.test>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    assert c.cmd(b"Subject: over tls\r\n\r\nhi\r\n.\r\n")[0] == 250
    c.close()
    new = new_messages(tmp / "spool", before)
    assert [m["from"] for m in new] == ["a@remote.test"]
    assert b"with ESMTPS id" in new[0]["data"]


def test_starttls_with_plaintext_after_it_before_handshake_fails_closed(engine) -> None:
    """Bytes sent after STARTTLS in a later plain-text packet, before the handshake, are
    not commands: the handshake fails and the connection ends; nothing runs."""
    _, tmp = engine
    before = spooled_ids(tmp / "spool")
    c = session(engine, source="127.0.0.2")
    assert c.cmd("STARTTLS")[0] == 220
    c.send(b"MAIL FROM:<evil@inbound.test>\r\nRCPT TO:<v@inbound.test>\r\nDATA\r\n")
    assert c.closed(wait=IDLE + 3)
    assert not c.buffer.startswith(b"250"), c.buffer
    assert spooled_ids(tmp / "spool") == before


# --- over-long lines, SIZE, recipients ------------------------------------------------------


def test_overlong_command_lines_are_refused_and_session_goes_on(engine) -> None:
    c = session(engine)
    code, text = c.cmd(b"MAIL FROM:<" + b"a" * 3000 + b"@shop.test>\r\n")
    assert code == 500 and "5.5.2" in text
    code, text = c.cmd(b"NOOP " + b"x" * 1_000_000 + b"\r\n")  # over many reads
    assert code == 500 and "5.5.2" in text
    assert c.cmd("MAIL FROM:<a@shop.test>")[0] == 250  # the session goes on, in step
    assert c.cmd("RCPT TO:<b@dest.test>")[0] == 250
    c.close()


def test_overlong_data_lines_are_stored_byte_for_byte(engine) -> None:
    _, tmp = engine
    before = spooled_ids(tmp / "spool")
    c = session(engine)
    body = b"Subject: long\r\n\r\n" + b"x" * 100_000 + b"\r\n" + b"y" * 999 + b"\r\n"
    c.send(b"MAIL FROM:<a@shop.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n" + body + b".\r\n")
    assert [r[0] for r in replies(c, 4)] == [250, 250, 354, 250]
    c.close()
    (stored,) = new_messages(tmp / "spool", before)
    assert body_of(stored) == body


def test_size_parameter_checks(engine) -> None:
    c = session(engine)
    for param, code, enhanced in [("SIZE=1000001", 552, "5.3.4"),
                                  ("SIZE=" + "9" * 20, 552, "5.3.4"),
                                  ("SIZE=" + "9" * 40, 501, "5.5.4"),
                                  ("SIZE=-1", 501, "5.5.4"), ("SIZE=", 501, "5.5.4"),
                                  ("SIZE=12abc", 501, "5.5.4"), ("SIZE", 501, "5.5.4")]:
        got, text = c.cmd(f"MAIL FROM:<a@shop.test> {param}")
        assert (got, text.split(" ")[0]) == (code, enhanced), param
    assert c.cmd("MAIL FROM:<a@shop.test> SIZE=1000000")[0] == 250
    c.close()


@pytest.fixture(scope="module")
def roomy_engine(tmp_path_factory: pytest.TempPathFactory):
    """1 MB messages, and timeouts long enough to stream 50 MB on a busy machine."""
    tmp = tmp_path_factory.mktemp("size")
    proc = start_engine(tmp, smtp={"max_message_size": 1_000_000, "max_command_line": 2048,
                                   "idle_timeout": 60.0, "data_timeout": 120.0})
    yield proc, tmp
    proc.stop()


@pytest.mark.parametrize("declared", [None, "SIZE=1000"])
def test_50mb_stream_is_refused_with_bounded_memory(roomy_engine, declared: str | None) -> None:
    """50 MB of data against a 1 MB limit, with no SIZE or a lying SIZE: 552 5.3.4, the
    worker's peak memory grows by far less than the stream, and the session goes on."""
    proc, tmp = roomy_engine
    (pid,) = proc.worker_pids()
    before_ids = spooled_ids(tmp / "spool")
    base = proc_status(pid)["VmRSS"]
    c = RawSmtp(proc.host, proc.port, timeout=120)
    c.greet()
    mail = "MAIL FROM:<a@shop.test>" + (f" {declared}" if declared else "")
    c.send(f"{mail}\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n".encode())
    assert [r[0] for r in replies(c, 3)] == [250, 250, 354]
    line = b"z" * 998 + b"\r\n"
    chunk = line * 1024  # 1 MB
    c.send(b"Subject: huge\r\n\r\n")
    for _ in range(50):
        c.send(chunk)
    code, text = c.cmd(b".\r\n")
    assert code == 552 and "5.3.4" in text
    peak = proc_status(pid)["VmHWM"]
    assert peak - base < 25_000, f"worker grew from {base} kB to a peak of {peak} kB"
    # A line of 20 MB with no end costs no memory either.
    c.send(b"NOOP " + b"n" * 20_000_000 + b"\r\n")
    code, text = c.reply()
    assert code == 500 and "5.5.2" in text
    assert proc_status(pid)["VmHWM"] - base < 25_000
    assert c.cmd("RSET")[0] == 250
    c.send(b"MAIL FROM:<a@shop.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n" + MSG + b".\r\n")
    assert [r[0] for r in replies(c, 4)] == [250, 250, 354, 250]
    c.close()
    assert len(spooled_ids(tmp / "spool") - before_ids) == 1


def test_recipients_past_the_limit(engine) -> None:
    _, tmp = engine
    before = spooled_ids(tmp / "spool")
    c = session(engine)
    c.send(b"MAIL FROM:<a@shop.test>\r\n"
           + b"".join(b"RCPT TO:<r%d@dest.test>\r\n" % i for i in range(130)))
    got = replies(c, 131)
    assert got[0][0] == 250
    assert [r[0] for r in got[1:101]] == [250] * 100
    assert all(code == 452 and text.startswith("4.5.3") for code, text in got[101:])
    assert c.cmd("DATA")[0] == 354
    assert c.cmd(MSG + b".\r\n")[0] == 250
    c.close()
    (stored,) = new_messages(tmp / "spool", before)
    assert stored["rcpts"] == [f"r{i}@dest.test" for i in range(100)]


# --- control characters, 8-bit data, unknown commands --------------------------------------


@pytest.mark.parametrize("line", [
    b"MAIL FROM:<a\x00@shop.test>", b"MAIL FROM:<a@shop.test>\x00", b"MAIL FROM:<a@shop.test> \x00",
    b"MAIL FROM:<a@sh\x01op.test>", b"MAIL FROM:<a\x7f@shop.test>", b"MAIL FROM:<a\tb@shop.test>",
    b"MAIL FROM:<a@shop.test>\rRCPT TO:<x@dest.test>", b"MAIL FROM:<\xff@shop.test>",
    b"MAIL FROM:<a@shop.test> BODY=8BIT\x1bMIME", b"MAIL FROM:<a@shop.test> AUTH=\xfe",
])
def test_control_characters_in_mail_are_refused(engine, line: bytes) -> None:
    c = session(engine)
    code, text = c.cmd(line + b"\r\n")
    assert code in (501, 553) and text[:2] == "5.", (line, text)
    assert c.cmd("MAIL FROM:<a@shop.test>")[0] == 250  # no MAIL was recorded
    c.close()


@pytest.mark.parametrize("line", [
    b"RCPT TO:<b\x00@dest.test>", b"RCPT TO:<b@dest.test\x00>", b"RCPT TO:<b@de\x0bst.test>",
    b"RCPT TO:<b@dest\x1f.test>", b"RCPT TO:<\"b\x07\"@dest.test>", b"RCPT TO:<b@\xc0\xaf.test>",
    b"RCPT TO:<b@dest.test>\rDATA", b"RCPT TO:<b\x85@dest.test>",
])
def test_control_characters_in_rcpt_are_refused(engine, line: bytes) -> None:
    _, tmp = engine
    before = spooled_ids(tmp / "spool")
    c = session(engine)
    assert c.cmd("MAIL FROM:<a@shop.test>")[0] == 250
    code, text = c.cmd(line + b"\r\n")
    assert code in (501, 553) and text[:2] == "5.", (line, text)
    assert c.cmd("DATA")[0] == 554  # no recipient was added
    c.close()
    assert spooled_ids(tmp / "spool") == before


@pytest.mark.parametrize("helo,mail", [
    ("EHLO client.test", "MAIL FROM:<a@shop.test> BODY=8BITMIME"),
    ("EHLO client.test", "MAIL FROM:<a@shop.test>"),
    ("EHLO client.test", "MAIL FROM:<a@shop.test> BODY=7BIT"),
    ("HELO client.test", "MAIL FROM:<a@shop.test>"),
])
def test_8bit_data_is_stored_byte_for_byte(engine, helo: str, mail: str) -> None:
    proc, tmp = engine
    before = spooled_ids(tmp / "spool")
    c = RawSmtp(proc.host, proc.port)
    assert c.reply()[0] == 220
    assert c.cmd(helo)[0] == 250
    body = ("From: a@shop.test\r\nSubject: Grüße \xa0\r\n\r\nçà € ü\r\n").encode() \
        + b"latin-1 \xe9\xe8\xff\x80\r\n"
    c.send(f"{mail}\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n".encode() + body + b".\r\n")
    assert [r[0] for r in replies(c, 4)] == [250, 250, 354, 250]
    c.close()
    (stored,) = new_messages(tmp / "spool", before)
    assert body_of(stored) == body


def test_unknown_commands_in_a_row_disconnect(engine) -> None:
    c = session(engine)
    assert c.cmd("BOGUS one")[0] == 500
    assert c.cmd(b"\x00\x01\x02\r\n")[0] == 500
    code, text = c.cmd("GET / HTTP/1.1")
    assert code == 421 and "4.7.0" in text
    assert c.closed()


def test_every_reply_after_ehlo_has_an_enhanced_status_code(engine) -> None:
    """ENHANCEDSTATUSCODES is advertised, so every reply but the greeting and EHLO's
    carries one (RFC 2034); VRFY says nothing about mailboxes, EXPN is off."""
    c = session(engine)
    assert c.cmd("EHLO client.test")[0] == 250
    commands = ["NOOP", "VRFY", "VRFY postmaster", "EXPN staff", "HELP", "RSET",
                "MAIL FROM:<a@shop.test>", "RCPT TO:<b@dest.test>", "RSET",
                "RCPT TO:<b@dest.test>", "DATA", "MAIL FROM:<bad", "QUIT"]
    for command in commands:
        code, text = c.cmd(command)
        assert re.match(rf"{str(code)[0]}\.\d{{1,3}}\.\d{{1,3}} ", text), (command, code, text)
        if command == "VRFY postmaster":
            assert code == 252
        if command.startswith("EXPN"):
            assert code == 502


def test_http_request_to_smtp_port_is_cut_off(engine) -> None:
    """A web request (a classic cross-protocol attack) pipelined in one packet."""
    proc, tmp = engine
    before = spooled_ids(tmp / "spool")
    c = RawSmtp(proc.host, proc.port)
    assert c.reply()[0] == 220
    c.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 90\r\n\r\n"
           b"MAIL FROM:<a@shop.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\nx\r\n.\r\n")
    codes = []
    while True:
        try:
            codes.append(c.reply()[0])
        except ConnectionError:
            break
    assert codes == [500, 500, 421]
    assert spooled_ids(tmp / "spool") == before


# --- greeting, slow clients, connection caps ------------------------------------------------


def test_client_talking_before_the_greeting_is_refused(engine) -> None:
    proc, tmp = engine
    before = spooled_ids(tmp / "spool")
    c = RawSmtp(proc.host, proc.port, source="127.0.0.3")
    c.send(b"EHLO fast.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<postmaster@inbound.test>\r\n"
           b"DATA\r\nSubject: early\r\n\r\nx\r\n.\r\n")
    code, text = c.reply()
    assert code == 554 and text.startswith("5.5.1")
    assert c.closed()
    assert c.buffer == b""  # nothing else was answered
    assert spooled_ids(tmp / "spool") == before
    # A patient client from the same address is served, after the pause.
    started = time.monotonic()
    c = RawSmtp(proc.host, proc.port, source="127.0.0.3")
    assert c.reply()[0] == 220
    assert time.monotonic() - started >= PAUSE * 0.9
    assert c.cmd("EHLO patient.test")[0] == 250
    c.close()
    # Trusted clients (the upstream apps) are not made to wait.
    started = time.monotonic()
    c = RawSmtp(proc.host, proc.port)
    assert c.reply()[0] == 220
    assert time.monotonic() - started < PAUSE
    c.close()


def test_slow_loris_command_is_cut_off(engine) -> None:
    c = session(engine)
    took = send_slowly(c, b"MAIL FROM:<slow@shop.test>\r\n", interval=1.0, limit=IDLE + 6)
    assert took < IDLE + 3, f"still connected after {took:.1f}s"
    assert c.closed(wait=1)


def test_slow_loris_data_is_cut_off_and_nothing_stored(engine) -> None:
    _, tmp = engine
    before = spooled_ids(tmp / "spool")
    c = session(engine)
    c.send(b"MAIL FROM:<a@shop.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n")
    assert [r[0] for r in replies(c, 3)] == [250, 250, 354]
    took = send_slowly(c, b"Subject: slow\r\n\r\n" + b"x" * 30 + b"\r\n.\r\n", interval=1.0,
                       limit=DATA_TIMEOUT + 6)
    assert took < DATA_TIMEOUT + 3, f"still connected after {took:.1f}s"
    assert spooled_ids(tmp / "spool") == before


def test_500_idle_connections_from_one_address_hit_the_cap(engine) -> None:
    """50 per address: the other 450 get 421 4.7.0 and are closed; another address is
    served meanwhile; once the idle ones go, the address is served again."""
    proc, tmp = engine
    before = spooled_ids(tmp / "spool")
    socks: list[socket.socket] = []
    try:
        for _ in range(500):
            s = socket.create_connection((proc.host, proc.port), timeout=10,
                                         source_address=("127.0.0.4", 0))
            socks.append(s)
        greetings: dict[int, int] = {}
        codes: dict[socket.socket, int] = {}
        for s in socks:
            first = s.recv(512)
            codes[s] = int(first[:3])
            greetings[codes[s]] = greetings.get(codes[s], 0) + 1
        assert greetings == {220: 50, 421: 450}, greetings
        refused = [s for s in socks if codes[s] == 421]
        assert len(refused) == 450
        for s in refused:  # closed by the engine
            s.settimeout(3)
            assert s.recv(1) == b""
        other = RawSmtp(proc.host, proc.port, source="127.0.0.5")
        other.greet()
        other.send(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<postmaster@inbound.test>\r\nDATA\r\n"
                   + MSG + b".\r\n")
        assert [r[0] for r in replies(other, 4)] == [250, 250, 354, 250]
        other.close()
    finally:
        for s in socks:
            s.close()

    def served_again() -> bool:
        c = RawSmtp(proc.host, proc.port, source="127.0.0.4")
        try:
            return c.reply()[0] == 220
        finally:
            c.close()

    assert wait_until(served_again, timeout=5)
    assert len(spooled_ids(tmp / "spool") - before) == 1


def test_engine_still_takes_mail_after_the_abuse(engine) -> None:
    """After all of the above (module order), the engine still takes mail normally."""
    proc, tmp = engine
    before = spooled_ids(tmp / "spool")
    c = session(engine)
    c.send(b"MAIL FROM:<a@shop.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n" + MSG + b".\r\n")
    assert [r[0] for r in replies(c, 4)] == [250, 250, 354, 250]
    c.close()
    assert len(stored_messages(tmp / "spool")) == len(before) + 1
