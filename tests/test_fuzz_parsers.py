"""Parsers under fuzzing (issue 10): hypothesis on the RFC 5321 path parser, the DATA
helpers (end-of-data and dot-stuffing), the SMTP server session (without sockets), the
bounce/ARF parser and the DKIM signer.

Short, bounded runs here (FUZZ_EXAMPLES, 150 by default); `bench/fuzz.py` runs the
same properties with many more examples (and atheris, when it is installed).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from functools import cache
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mta.address import Address, AddressError, parse_path
from mta.bounce import KINDS, REASONS, parse_bounce
from mta.config import Config, DkimConfig
from mta.dkim import DkimSigner
from mta.dkim.canon import normalize_message
from mta.queue.commit import GroupCommitter
from mta.queue.spool import Spool
from mta.smtp.intake import (
    Intake,
    from_domains,
    header_value,
    read_campaign,
    sender_routed,
    unquoted,
)
from mta.smtp.session import (
    CheckLogin,
    Client,
    Deliver,
    Envelope,
    Event,
    Reply,
    ServerSession,
    Settings,
    is_clean_data,
    unstuff,
)
from mta.text import MAX_NAME, name_problem

FUZZ_EXAMPLES = int(os.environ.get("MTA_FUZZ_EXAMPLES", "150"))
fuzz = settings(max_examples=FUZZ_EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

REPLY = re.compile(r"[45]\d\d [45]\.\d{1,3}\.\d{1,3} \S")

# --- the path parser ---------------------------------------------------------------------

ATEXT = "abcXYZ019!#$%&'*+/=?^_`{|}~-"
PATH_ALPHABET = list(ATEXT) + list('<>@"\\[]:,.; \t\r\n\0\x7f=') + [
    "é", "ü", "\u00a0", "\u0085", "\u2028", "\u3002", "\ufeff", "\U0001f600", "\udcff",
    "IPv6:", "::1", "192.0.2.1", "SIZE=", "BODY=8BITMIME", "SMTPUTF8", "example.com",
    "@relay.test:", "postmaster",
]
path_text = st.lists(st.sampled_from(PATH_ALPHABET), max_size=40).map("".join)


def check_path(text: str) -> Address | None:
    """parse_path either refuses with a well-formed SMTP reply, or splits without
    rewriting: the address it returns is in the input as it stands."""
    try:
        address, params = parse_path(text, allow_null=True)
    except AddressError as refused:
        assert REPLY.match(refused.reply), refused.reply
        return None
    rendered = str(address)
    rendered.encode("utf-8")  # no undecodable bytes (surrogates) get through
    assert not re.search(r"[\x00-\x1f\x7f]", rendered), rendered
    assert address.domain == address.domain.lower()
    assert "@" not in address.domain
    if address.is_null:
        assert "<>" in text
    else:
        assert address.local and address.domain
        assert rendered.lower() in text.lower(), (text, rendered)
        assert parse_path(f"<{rendered}>")[0] == address  # canonical: parses to itself
    for key in params:
        assert key == key.upper() and re.fullmatch(r"[A-Z0-9][A-Z0-9-]*", key), key
    return address


@fuzz
@given(path_text)
@example("<victim%dest.test@inbound.test>")
@example('<"victim@dest.test"@[127.0.0.1]>')
@example("<victim@dest.test@[127.0.0.1]>")
@example("<@a.test,@b.test:u@c.test> SIZE=10")
def test_path_parser_refuses_cleanly_or_splits_without_rewriting(text: str) -> None:
    check_path(text)


@fuzz
@given(st.binary(max_size=80))
def test_path_parser_on_raw_command_bytes(raw: bytes) -> None:
    """What the server hands the parser: the bytes decoded with surrogateescape."""
    check_path(raw.decode("utf-8", "surrogateescape"))
    check_path("<" + raw.decode("utf-8", "surrogateescape") + "@example.com>")


label = st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
domain = st.lists(label, min_size=1, max_size=4).map(".".join)
dot_atom = st.lists(st.text(ATEXT, min_size=1, max_size=8), min_size=1, max_size=3).map(".".join)
quoted = st.lists(st.sampled_from(list("abc @%!.,:;<>[]()") + ['\\"', "\\\\"]), min_size=1,
                  max_size=10).map(lambda s: '"' + "".join(s) + '"')


@fuzz
@given(st.one_of(dot_atom, quoted), domain, st.lists(domain, max_size=2),
       st.sampled_from(["", " SIZE=100", " BODY=8BITMIME SMTPUTF8"]))
def test_valid_paths_split_at_the_real_at_sign(local: str, dom: str, route: list[str],
                                               params: str) -> None:
    """Whatever the local part holds (@, %, !, quotes), the domain is the text after the
    last @: the one the relay decision is made on."""
    prefix = (",".join(f"@{r}" for r in route) + ":") if route else ""
    text = f"<{prefix}{local}@{dom.upper()}>{params}"
    if len(text.split(">")[0]) > 257 or len(local.encode()) > 64:
        return
    address, parsed = parse_path(text)
    assert (address.local, address.domain) == (local, dom)
    content = local[1:-1].replace('\\"', '"').replace("\\\\", "\\") if local[0] == '"' else local
    assert sender_routed(address.local) == any(c in content for c in "@%!")


# --- DATA: end of data, dot-stuffing -------------------------------------------------------

text_line = st.binary(max_size=120).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")
                                        .replace(b"\0", b""))


@fuzz
@given(st.lists(text_line, max_size=30))
def test_dot_stuffing_round_trips(lines: list[bytes]) -> None:
    """A client dot-stuffs its lines; the engine's unstuff gives back exactly the lines."""
    message = b"".join(line + b"\r\n" for line in lines)
    stuffed = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n"
                       for line in lines)
    wire = b"\r\n" + stuffed  # as the session holds it: the DATA line's CRLF first
    assert is_clean_data(wire)
    assert unstuff(wire) == message
    assert b"\r\n.\r\n" not in wire  # a stuffed message never holds the end of data


@fuzz
@given(st.lists(text_line, min_size=1, max_size=10), st.data())
def test_any_bare_cr_lf_or_nul_makes_data_unclean(lines: list[bytes], data: st.DataObject
                                                  ) -> None:
    clean = b"\r\n" + b"".join(line + b"\r\n" for line in lines)
    bad = data.draw(st.sampled_from([b"\r", b"\n", b"\0", b"\n.", b"\r.\r", b"\n.\r\n",
                                     b".\0\r\n"]))
    at = data.draw(st.integers(0, len(clean)))
    dirty = clean[:at] + bad + clean[at:]
    if dirty.count(b"\r\n") * 2 == dirty.count(b"\r") + dirty.count(b"\n") and b"\0" not in dirty:
        return  # the insertion happened to complete a CRLF pair: still clean
    assert not is_clean_data(dirty)


# --- the SMTP server session, without sockets -----------------------------------------------


class StubPolicy:
    """Refuses recipients at refused.test; 300 bytes of data at most."""

    def check_mail(self, client: Client, sender: Address, size: int) -> str | None:
        return None

    def check_rcpt(self, client: Client, envelope: Envelope, rcpt: Address) -> str | None:
        return "550 5.7.1 Relay access denied" if rcpt.domain == "refused.test" else None

    def data_limit(self, client: Client, envelope: Envelope) -> int:
        return 300

    def auth_delay(self, ip: str) -> float | None:
        return 0.0


def converse(chunks: list[bytes], policy: StubPolicy, trusted: bool = True) -> list[Event]:
    """Feed the chunks in turn; answer each piece of work at once (a message is stored,
    the password "pw" is right). A trusted client may AUTH in clear; an untrusted one is
    held to 3 commands that move no mail."""
    settings = Settings(hostname="mx.test", max_message_size=300, max_command_line=80,
                        max_unknown_commands=1000, max_errors=0, max_junk_commands=3)
    session = ServerSession(settings, Client("192.0.2.1", trusted=trusted), policy)
    events = answered(session, session.start())
    for chunk in chunks:
        events += answered(session, session.feed(chunk))
    session.connection_lost()
    return events


def answered(session: ServerSession, events: list[Event]) -> list[Event]:
    out = list(events)
    last = events[-1] if events else None
    if isinstance(last, Deliver):
        out += answered(session, session.delivered("250 2.0.0 Ok"))
    elif isinstance(last, CheckLogin):
        out += answered(session, session.login_checked(last.password == b"pw"))
    return out


TRANSACTION = b"EHLO c.test\r\nMAIL FROM:<a@shop.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n"
session_command = st.sampled_from([
    b"EHLO c.test\r\n", b"HELO c.test\r\n", b"MAIL FROM:<a@shop.test>\r\n",
    b"MAIL FROM:<a@shop.test> SIZE=99999\r\n", b"RCPT TO:<b@dest.test>\r\n",
    b"RCPT TO:<b@refused.test>\r\n", b"RCPT TO:<postmaster>\r\n", b"DATA\r\n", b"RSET\r\n",
    b"NOOP\r\n", b"QUIT\r\n", b"STARTTLS\r\n", b"AUTH PLAIN AHNob3AAcHc=\r\n", b"AUTH LOGIN\r\n",
    b"AUTH PLAIN\r\n", b"c2hvcA==\r\n", b"cHc=\r\n", b"*\r\n", b"\r\n.\r\n", b"BOGUS\r\n",
    b"NOOP\n", b"x" * 100 + b"\r\n", b"HELP\r\n", b"VRFY <a@b.test>\r\n", b"EXPN x\r\n",
])
message = st.lists(st.sampled_from([b"Subject: x", b"", b".", b"..", b"..x", b"a\rb", b"a\nb",
                                    b"n\0l", b"y" * 120]), max_size=6).map(
    lambda lines: b"".join(line + b"\r\n" for line in lines) + b".\r\n")
session_streams = st.lists(st.one_of(session_command, message.map(TRANSACTION.__add__),
                                     st.binary(max_size=8)), max_size=20).map(b"".join)


@fuzz
@given(session_streams, st.lists(st.integers(0, 400), max_size=6), st.booleans())
@example(TRANSACTION + b"hello\r\n.\r\nNOOP\r\n", [len(TRANSACTION) + 8], True)
@example(b"NOOP " + b"x" * 100 + b"\r\nNOOP\r\n", [90], True)
@example(b"EHLO a\r\nNOOP\r\nRSET\r\nEHLO b\r\nHELP\r\nNOOP\r\n", [12, 30], False)
def test_session_answers_alike_however_the_input_is_cut(stream: bytes, cuts: list[int],
                                                        trusted: bool) -> None:
    """The server session is a state machine over bytes: the same input gives the same
    replies and work whether it comes in one piece or cut anywhere; every reply is a
    well-formed SMTP reply and every message handed over is clean."""
    whole = converse([stream], StubPolicy(), trusted)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    cut = converse([stream[a:b] for a, b in zip(points, points[1:], strict=False)], StubPolicy(),
                   trusted)
    assert whole == cut
    for event in whole:
        if isinstance(event, Reply):
            for line in event.text.split("\r\n"):
                assert re.fullmatch(r"[2-5]\d\d[ -][^\r\n]*", line), event
        elif isinstance(event, Deliver):
            assert is_clean_data(b"\r\n" + event.content) and event.envelope.recipients


# --- header reading at intake ----------------------------------------------------------------

header_piece = st.sampled_from([b"From", b"from", b"FROM", b"X-Campaign-ID", b"Subject", b":",
                                b" ", b"\t", b"\r\n", b"\r\n ", b"\r\n\t", b"a@shop.test",
                                b"<b@other.test>", b"\"x@y\"", b",", b"\xff", b"=?utf-8?q?a?=",
                                b"(c@d.test)", b"@", b"shop.test", b"\0"])


@fuzz
@given(st.lists(header_piece, max_size=40).map(b"".join))
def test_intake_header_readers_never_raise(block: bytes) -> None:
    value = header_value(block, b"X-Campaign-ID")
    assert "\r" not in value and "\n" not in value
    for dom in from_domains(block):
        assert dom and dom == dom.lower()


# Every kind of line break, control and format characters, encoded-words, long runs.
name_piece = st.sampled_from([
    "spring", "Sale 2024", " ", "\t", "\r", "\n", "\r\n", "\r\n ", "\r\n\t", "\x0b", "\x0c",
    "\x1c", "\x85", "\u2028", "\u2029", "\x00", "\x1b[31m", "\x7f", "\u202e", "\u200b", "\ufeff",
    "\u00a0", "=?utf-8?q?", "?=", "=?", "\u00e9", "\U0001f600", "x" * 60, ":", "X-Campaign-ID: ",
])
campaign_value = st.one_of(st.lists(name_piece, max_size=8).map(lambda p: "".join(p).encode()),
                           st.binary(max_size=20))


@fuzz
@given(campaign_value, st.lists(st.sampled_from([b"Subject: x\r\n", b"From: a@b.test\r\n",
                                                 b"x-campaign-id: other\r\n"]), max_size=3))
@example("spring\u2028sale".encode(), [])
@example(b"c" * (MAX_NAME + 1), [])
def test_campaign_names_are_taken_whole_or_refused(value: bytes, others: list[bytes]) -> None:
    """Whatever a campaign field holds, the intake either takes a fit name, exactly as
    written (a fold reads as one space), or refuses with one clean 550 5.6.0 line naming
    the field; it never truncates, never raises."""
    block = b"".join(others) + b"X-Campaign-ID: " + value + b"\r\n"
    name, refusal = read_campaign(block, "X-Campaign-ID")
    if refusal is not None:
        assert name == "" and re.fullmatch(r"550 5\.6\.0 X-Campaign-ID: [\x20-\x7e]+", refusal)
        return
    assert name_problem(name) is None and len(name) <= MAX_NAME
    assert b"x-campaign-id" not in b"".join(others)  # a second field is never taken
    assert name.encode() in re.sub(rb"\r\n[ \t]+", b" ", block)


# --- mail for the engine's own names ------------------------------------------------------------


@cache
def intake() -> Intake:
    spool = Spool(Path(tempfile.mkdtemp(prefix="mta-fuzz-intake-")), map_size=16 * 1024**2)
    return Intake(Config(), spool, GroupCommitter(spool))  # hostname mta.localhost


@fuzz
@given(st.sampled_from(["postmaster", "PostMaster", "abuse", "root", "a.b", '"postmaster"',
                        '"post master"', "postmaster+x", "x%y", "a!b", '"a@b"', "mailer-daemon"]),
       st.sampled_from(["mta.localhost", "MTA.localhost", "localhost", "x.y.localhost",
                        "localhost.localdomain", "[127.0.0.1]", "[127.9.9.9]", "[IPv6:::1]",
                        "[0.0.0.0]"]),
       st.booleans())
def test_own_names_take_postmaster_and_local_mailboxes_only(local: str, dom: str,
                                                            trusted: bool) -> None:
    """At any of the engine's own names, whoever asks: postmaster and abuse are taken,
    every other mailbox gets one clean 550 5.1.1 (or 5.7.1 for an outsider's route)."""
    address, _ = parse_path(f"<{local}@{dom}>")
    refusal = intake().check_rcpt(Client("192.0.2.9", trusted=trusted), Envelope(), address)
    if not trusted and sender_routed(address.local):
        assert refusal is not None and refusal.startswith("550 5.7.1 ")
    elif unquoted(address.local).lower() in ("postmaster", "abuse"):
        assert refusal is None
    else:
        assert refusal is not None and re.fullmatch(r"550 5\.1\.1 <[\x20-\x7e]+>: no such mailbox here",
                                                    refusal), refusal


# --- the bounce / ARF parser -------------------------------------------------------------------

fields = st.sampled_from([
    b"Final-Recipient", b"Original-Recipient", b"Action", b"Status", b"Diagnostic-Code",
    b"Remote-MTA", b"Reporting-MTA", b"Feedback-Type", b"User-Agent", b"Version",
    b"Original-Mail-From", b"Arrival-Date", b"Source-IP", b"X-Postfix-Queue-ID",
    b"Content-Type", b"Content-Transfer-Encoding", b"Message-ID", b"X-Campaign-ID",
    b"Return-Path", b"Auto-Submitted", b"Precedence", b"X-Failed-Recipients",
])
values = st.one_of(
    st.sampled_from([
        b"rfc822; user@example.com", b"rfc822;<a@b>", b"failed", b"delayed", b"delivered",
        b"5.1.1", b"4.2.2", b"9.9.9", b"5.", b"smtp; 550 5.1.1 <u@x> User unknown",
        b"smtp; 452-4.2.2 mailbox full", b"dns; mx.example.com", b"abuse", b"opt-out",
        b"multipart/report; report-type=delivery-status; boundary=\"B\"",
        b"multipart/report; report-type=feedback-report; boundary=B",
        b"message/rfc822", b"text/rfc822-headers", b"base64", b"quoted-printable",
        b"=?utf-8?b?w6k=?=", b"auto-replied", b"bulk", b"<b+aaaaaaaaaaaaaaaaaaaaaaaa@bounces.test>",
    ]),
    st.binary(max_size=60),
)
line = st.tuples(fields, values).map(lambda fv: fv[0] + b": " + fv[1])
block = st.lists(line, max_size=8).map(lambda ls: b"\r\n".join(ls) + b"\r\n")
prose = st.sampled_from([
    b"This is the mail system at host mx.example.com.\r\n",
    b"I'm sorry to have to inform you that your message could not be delivered.\r\n",
    b"<user@example.com>: host mx.example.com said: 550 5.1.1 User unknown\r\n",
    b"Delivery to the following recipient failed permanently:\r\n\r\n     a@b.test\r\n",
    b"I am out of the office until Monday.\r\n", b"Mailbox full\r\n", b"\xff\xfe\x00garbage\r\n",
])


@st.composite
def reports(draw: st.DrawFn) -> bytes:
    boundary = draw(st.sampled_from([b"B", b"=_b", b'"q"', b"", b"a b", b"\xff"]))
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        parts.append(draw(block) + b"\r\n" + draw(st.one_of(block, prose, st.binary(max_size=200))))
    top = draw(block)
    subject = draw(st.sampled_from([b"Undelivered Mail Returned to Sender", b"Abuse report",
                                    b"Auto: out of office", b"Delivery Status Notification",
                                    b"\xff\xfe"]))
    body = b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts)
    if draw(st.booleans()):
        body += b"--" + boundary + b"--\r\n"
    return (b"From: MAILER-DAEMON@mx.example.com\r\nSubject: " + subject + b"\r\n"
            + b"Content-Type: multipart/report; report-type=delivery-status; boundary=\""
            + boundary + b"\"\r\n" + top + b"\r\n" + draw(prose) + body)


def check_bounce(data: bytes) -> None:
    result = parse_bounce(data)
    assert result.kind in KINDS and result.reason in REASONS, (result.kind, result.reason)
    text = json.dumps(vars(result), ensure_ascii=False)
    text.encode("utf-8")  # valid text only, no surrogates
    assert all(isinstance(r, str) for r in result.recipients)
    if result.status is not None:
        assert re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", result.status), result.status


@fuzz
@given(reports())
def test_bounce_parser_never_raises_on_mangled_reports(data: bytes) -> None:
    check_bounce(data)


@fuzz
@given(reports(), st.integers(0, 10_000), st.binary(min_size=1, max_size=20))
def test_bounce_parser_never_raises_on_cut_and_spliced_reports(data: bytes, at: int,
                                                              noise: bytes) -> None:
    at %= len(data) + 1
    check_bounce(data[:at])
    check_bounce(data[:at] + noise + data[at:])


# --- the DKIM signer -----------------------------------------------------------------------------


@cache
def signer() -> DkimSigner:
    from tests.helpers.dkim import write_key

    directory = Path(tempfile.mkdtemp(prefix="mta-fuzz-dkim-"))
    keys = [write_key(directory, "example.com", "rsa1").config,
            write_key(directory, "example.com", "ed1", algorithm="ed25519-sha256").config,
            write_key(directory, "fallback.test", "fb", algorithm="ed25519-sha256").config]
    return DkimSigner.from_config(DkimConfig(keys=keys, fallback_domain="fallback.test"))


message_piece = st.sampled_from([
    b"From: a@example.com", b"From: \"x\" <a@EXAMPLE.com.>", b"From: a@other.test", b"From:",
    b"from:a@example.com", b"Subject: x", b"DKIM-Signature: v=1; d=x", b"To: b@c", b"\r\n",
    b"\n", b"\r", b"\r\n\r\n", b" ", b"\t", b":", b"\0", b"\xff", b"\xc3\xa9", b"=?utf-8?q?x?=",
    b"\r\n ", b"x" * 1200, b".", b"\r\n.\r\n",
])


def check_sign(data: bytes) -> None:
    """Signing never raises; a message it counts as signed carries a new DKIM-Signature
    field on top, and the message itself follows, line ends normalized."""
    was_signed, was_unsigned = signer().signed, signer().unsigned
    out = signer().sign(data, now=1_700_000_000)
    assert isinstance(out, bytes)
    signed = signer().signed - was_signed
    assert signed + signer().unsigned - was_unsigned == 1
    if signed:
        assert out.startswith(b"DKIM-Signature:")
        assert out.count(b"DKIM-Signature:") > data.count(b"DKIM-Signature:")
    assert out.endswith(normalize_message(data))  # nothing but fields prepended


@fuzz
@given(st.binary(max_size=3000))
def test_dkim_signer_never_raises_on_arbitrary_bytes(data: bytes) -> None:
    check_sign(data)
    check_sign(b"From: a@example.com\r\n" + data)


@fuzz
@given(st.lists(message_piece, max_size=40).map(b"".join))
def test_dkim_signer_never_raises_on_message_like_bytes(data: bytes) -> None:
    check_sign(data)
