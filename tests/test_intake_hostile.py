"""Hostile names and hostile traffic at intake (issue 24, "Hostile feedback and hostile
names": the intake findings).

- A campaign name is checked where it enters: a campaign field that is not a name
  (`mta.text.name_problem`: line breaks of every kind, control and format characters,
  encoded-words, over 128 characters, empty), is not UTF-8 or appears twice refuses the
  message with 550 5.6.0 naming the field and the problem; nothing is spooled. A bare CR
  or LF never gets that far: the session refuses the whole message (550 5.5.2).
- The engine's own names (hostname, localhost and every name under .localhost, the
  loopback literals) take mail for postmaster and `[engine] local_mailboxes` only, from
  anyone; it goes to `[engine] operator_address`, or stays on the engine as mail to
  the bounce domain (kept for the operator). Anything else there gets 550 5.1.1, from
  trusted clients too.
- Mail from unauthenticated clients to the engine's domains is held to `[bounce]
  max_report_size` while it streams: the excess is thrown away as it comes, 552 5.3.4.
- AUTH failures are limited per address for the whole engine, not per worker.
- Commands that move no mail (NOOP, RSET, HELP, VRFY, EXPN, EHLO/HELO again) from an
  untrusted, unauthenticated client are limited per session (`max_junk_commands`).
"""

from __future__ import annotations

import asyncio
import base64
import time
import tracemalloc
from pathlib import Path

import pytest

from bench.engine_proc import read_events
from mta.address import parse_path
from mta.config import Config, ConfigError, load_config
from mta.queue.commit import GroupCommitter
from mta.queue.spool import Spool
from mta.smtp.auth import hash_password
from mta.smtp.auth_limit import RESERVATION_TTL, AuthLimit
from mta.smtp.intake import Intake, read_campaign
from mta.smtp.session import (
    CLOSE,
    CheckLogin,
    Client,
    Deliver,
    Envelope,
    Event,
    Reply,
    ServerSession,
    Settings,
    StartTls,
)
from tests.helpers.abuse import engine_log, new_messages, proc_status, replies
from tests.helpers.engine import RawSmtp, spooled_ids, start_engine, wait_until

HOST = "mx.shop.test"  # [engine] hostname
BOUNCE = "bounces.shop.test"
UNTRUSTED = "127.0.0.2"
JUNK_LIMIT = 10
MSG = b"From: a@shop.test\r\nTo: b@dest.test\r\nSubject: t\r\n\r\nhello\r\n"


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


# --- the session, without sockets ---------------------------------------------------------


class Policy:
    """Takes every recipient; data is limited to `limit` bytes for bounces.test only."""

    def __init__(self, limit: int = 300) -> None:
        self.limit = limit

    def check_mail(self, client, sender, size) -> str | None:
        return None

    def check_rcpt(self, client, envelope, rcpt) -> str | None:
        return None

    def data_limit(self, client: Client, envelope: Envelope) -> int:
        local = all(r.endswith("@bounces.test") for r in envelope.recipients)
        return self.limit if local else 0

    def auth_delay(self, ip: str) -> float | None:
        return 0.0


def new_session(trusted: bool = False, tls: bool = False, limit: int = 300,
                **settings: int) -> ServerSession:
    session = ServerSession(Settings(hostname="mx.test", **settings),
                            Client("192.0.2.7", trusted=trusted), Policy(limit),
                            tls_available=tls)
    session.start()
    return session


def texts(events: list[Event]) -> list[str]:
    return [e.text for e in events if isinstance(e, Reply)]


def say(session: ServerSession, line: str) -> list[str]:
    return texts(session.feed(line.encode() + b"\r\n"))


def test_junk_commands_past_the_limit_end_an_untrusted_session() -> None:
    s = new_session(max_junk_commands=5)
    assert say(s, "EHLO c.test")[0].startswith("250")  # the first greeting is not junk
    for line in ["NOOP", "RSET", "HELP", "VRFY <a@b.test>", "EXPN list"]:
        assert not say(s, line)[0].startswith("421"), line
    events = s.feed(b"NOOP\r\n")
    assert texts(events) == ["421 4.7.0 mx.test Too many commands that send no mail, closing"]
    assert events[-1] == CLOSE
    assert s.feed(b"NOOP\r\n") == []


def test_greeting_again_and_again_is_junk() -> None:
    s = new_session(max_junk_commands=3)
    replies_seen = [say(s, "EHLO c.test")[0][:3] for _ in range(5)]
    assert replies_seen == ["250", "250", "250", "250", "421"]


def test_junk_count_starts_afresh_after_each_message_taken() -> None:
    s = new_session(max_junk_commands=3)
    say(s, "EHLO c.test")
    for _ in range(3):
        say(s, "NOOP")
    events = s.feed(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\nhi\r\n.\r\n")
    assert isinstance(events[-1], Deliver)
    assert texts(s.delivered("250 2.0.0 Ok")) == ["250 2.0.0 Ok"]
    assert [say(s, "NOOP")[0][:3] for _ in range(4)] == ["250", "250", "250", "421"]


def test_trusted_and_authenticated_clients_are_not_held_to_the_junk_limit() -> None:
    trusted = new_session(trusted=True, max_junk_commands=3)
    say(trusted, "EHLO c.test")
    assert all(say(trusted, "NOOP") == ["250 2.0.0 OK"] for _ in range(50))
    authed = new_session(tls=True, max_junk_commands=3)
    say(authed, "EHLO c.test")
    assert isinstance(authed.feed(b"STARTTLS\r\n")[-1], StartTls)
    authed.tls_started()
    say(authed, "EHLO c.test")
    events = authed.feed(f"AUTH PLAIN {plain('shop', 'pw')}\r\n".encode())
    assert isinstance(events[-1], CheckLogin)
    assert texts(authed.login_checked(True)) == ["235 2.7.0 Authentication successful"]
    assert all(say(authed, "NOOP") == ["250 2.0.0 OK"] for _ in range(50))


def test_the_junk_limit_can_be_switched_off() -> None:
    s = new_session(max_junk_commands=0)
    say(s, "EHLO c.test")
    assert all(say(s, "NOOP") == ["250 2.0.0 OK"] for _ in range(300))


def test_data_past_the_transactions_limit_is_thrown_away_as_it_comes() -> None:
    """20 MiB streamed against a limit of 300 bytes: 552 5.3.4 at the final dot, nothing
    handed over, and the session never holds more than a read's worth of it."""
    s = new_session()
    say(s, "EHLO c.test")
    s.feed(b"MAIL FROM:<>\r\nRCPT TO:<b@bounces.test>\r\nDATA\r\n")
    chunk = (b"z" * 1022 + b"\r\n") * 64  # 64 KiB
    tracemalloc.start()
    try:
        for _ in range(320):
            assert s.feed(chunk) == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, peak
    events = s.feed(b".\r\n")
    assert texts(events) == ["552 5.3.4 Message too big (at most 300 bytes here)"]
    assert not any(isinstance(e, Deliver) for e in events)
    assert say(s, "NOOP") == ["250 2.0.0 OK"]  # the session goes on


def test_the_limit_is_the_policys_for_each_transaction() -> None:
    s = new_session(limit=300)
    say(s, "EHLO c.test")
    body = b"Subject: x\r\n\r\n" + b"y" * 5000 + b"\r\n.\r\n"
    events = s.feed(b"MAIL FROM:<>\r\nRCPT TO:<b@bounces.test>\r\nDATA\r\n" + body)
    assert texts(events)[-1].startswith("552 5.3.4")
    events = s.feed(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n" + body)
    assert isinstance(events[-1], Deliver)  # no limit for this one


def test_an_address_out_of_guesses_is_cut_off_at_the_check() -> None:
    s = new_session(trusted=True)
    say(s, "EHLO c.test")
    assert isinstance(s.feed(f"AUTH PLAIN {plain('shop', 'x')}\r\n".encode())[-1], CheckLogin)
    events = s.login_checked(None)
    assert texts(events) == ["421 4.7.0 Too many failed authentications, try again later"]
    assert events[-1] == CLOSE


# --- the intake's decisions, on a real spool, without sockets -----------------------------------

CAMPAIGN = b"X-Campaign-ID"
HOSTILE_NAMES = {
    "vertical tab": (b"spring\x0bsale", "holds a line break (U+000B)"),
    "form feed": (b"spring\x0csale", "holds a line break (U+000C)"),
    "next line": ("spring\u0085sale".encode(), "holds a line break (U+0085)"),
    "line separator": ("spring\u2028sale".encode(), "holds a line break (U+2028)"),
    "paragraph separator": ("spring\u2029sale".encode(), "holds a line break (U+2029)"),
    "escape": (b"spring\x1b[2Jsale", "holds a control or format character (U+001B)"),
    "bidi override": ("spring\u202esale".encode(),
                      "holds a control or format character (U+202E)"),
    "encoded-word": (b"=?utf-8?q?spring=0D=0Asale?=", "holds an RFC 2047 encoded-word"),
    "129 characters": (b"c" * 129, "is longer than 128 characters"),
    "empty": (b"", "is empty"),
    "no-break space": ("spring\u00a0".encode(), "holds white space other than a plain space (U+00A0)"),
    "not UTF-8": (b"spring\xffsale", "is not valid UTF-8"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_NAMES))
def test_unfit_campaign_names_are_refused_naming_the_field(name: str) -> None:
    value, problem = HOSTILE_NAMES[name]
    block = b"From: a@shop.test\r\nX-Campaign-ID: " + value + b"\r\nSubject: x\r\n"
    assert read_campaign(block, "X-Campaign-ID") == ("", f"550 5.6.0 X-Campaign-ID: {problem}")


def test_campaign_names_that_are_fit_are_taken_whole() -> None:
    for value, name in [(b"spring", "spring"), (b"c" * 128, "c" * 128),
                        (b"  Fr\xc3\xbchling 2024 ", "Fr\u00fchling 2024"),
                        (b"spring\r\n\tsale", "spring sale")]:  # a fold reads as a space
        assert read_campaign(b"x-campaign-id:" + value + b"\r\n", "X-Campaign-ID") == (name, None)
    assert read_campaign(b"Subject: x\r\n", "X-Campaign-ID") == ("", None)


def test_several_campaign_fields_are_ambiguous() -> None:
    block = b"X-Campaign-ID: spring\r\nSubject: x\r\nx-campaign-id: autumn\r\n"
    assert read_campaign(block, "X-Campaign-ID") == (
        "", "550 5.6.0 X-Campaign-ID: appears 2 times; a message belongs to one campaign")


def test_a_field_is_read_whole_and_only_where_a_field_starts() -> None:
    from mta.smtp.intake import raw_field_values

    block = (b"X-Campaign-ID\t : spring\r\n\tsale\r\n"  # blanks before the colon, a fold
             b"Subject: hi\r\n X-Campaign-ID: not a field\r\n"  # inside a fold: a value
             b"X-Note: a\nX-Campaign-ID: bare LF\r\n"  # after a bare LF: still X-Note's
             b"X-Campaign-IDs: other\r\n")  # a longer name is another field
    assert raw_field_values(block, b"x-campaign-id") == [b"spring sale"]
    assert raw_field_values(block, b"X-Note") == [b"a\nX-Campaign-ID: bare LF"]
    assert raw_field_values(block, b"Subject") == [b"hi X-Campaign-ID: not a field"]
    assert raw_field_values(block, b"X-Missing") == []


def intake_on(tmp: Path, **engine: object) -> Intake:
    cfg = Config()
    cfg.engine.hostname = HOST
    cfg.bounce.domain = BOUNCE
    for key, value in engine.items():
        setattr(cfg.engine, key, value)
    spool = Spool(tmp / "spool", map_size=64 * 1024**2)
    return Intake(cfg, spool, GroupCommitter(spool))


OWN = ["anyone@mx.shop.test", "root@localhost", "a@localhost.localdomain", "a@x.localhost",
       "a@[127.0.0.1]", "a@[127.0.0.2]", "a@[IPv6:::1]", "a@[0.0.0.0]", "postmaster+x@mx.shop.test"]
TAKEN = ["postmaster@mx.shop.test", "PostMaster@MX.SHOP.TEST", '"postmaster"@mx.shop.test',
         "abuse@mx.shop.test", "postmaster@localhost", "postmaster@[127.0.0.1]"]


@pytest.mark.parametrize("trusted", [False, True])
def test_own_names_take_postmaster_and_the_local_mailboxes_only(tmp_path: Path,
                                                                trusted: bool) -> None:
    intake = intake_on(tmp_path)
    client = Client("192.0.2.9", trusted=trusted)
    for rcpt in OWN:
        address, _ = parse_path(f"<{rcpt}>")
        refusal = intake.check_rcpt(client, Envelope(), address)
        assert refusal == f"550 5.1.1 <{address}>: no such mailbox here", rcpt
    for rcpt in TAKEN + [f"anyone@{BOUNCE}"]:
        assert intake.check_rcpt(client, Envelope(), parse_path(f"<{rcpt}>")[0]) is None, rcpt
    intake.spool.close()


def test_data_limit_is_the_report_size_for_unauthenticated_mail_to_the_engine(
        tmp_path: Path) -> None:
    intake = intake_on(tmp_path)
    report, message = 1024**2, 26_214_400
    for client in (Client("192.0.2.9"), Client("127.0.0.1", trusted=True)):
        assert intake.data_limit(client, Envelope("", [f"b+x@{BOUNCE}"])) == report
        assert intake.data_limit(client, Envelope("", [f"postmaster@{HOST}"])) == report
    trusted = Client("127.0.0.1", trusted=True)
    assert intake.data_limit(trusted, Envelope("", [f"b@{BOUNCE}", "c@dest.test"])) == message
    assert intake.data_limit(Client("192.0.2.9", login="shop"),
                             Envelope("", [f"b@{BOUNCE}"])) == message
    intake.spool.close()


async def accept_one(intake: Intake, rcpts: list[str], data: bytes = MSG) -> list[str]:
    intake.committer.start()
    try:
        reply = await intake.accept(Client("192.0.2.9"), Envelope("x@remote.test", rcpts), data)
        assert reply.startswith("250 "), reply
        with intake.spool.read() as txn:
            [stored] = list(intake.spool.messages(txn))
    finally:
        await intake.committer.close()
        intake.spool.close()
    if len(rcpts) == 1:
        assert f"for <{rcpts[0]}>".encode() in stored["data"]  # the Received: field says
    return stored["rcpts"]


@pytest.mark.asyncio
async def test_postmaster_mail_stays_on_the_engine_by_default(tmp_path: Path) -> None:
    rcpts = await accept_one(intake_on(tmp_path), [f"PostMaster@{HOST}", "abuse@localhost",
                                                   f"postmaster@{HOST}"])
    assert rcpts == [f"postmaster@{BOUNCE}", f"abuse@{BOUNCE}"]


@pytest.mark.asyncio
async def test_postmaster_mail_goes_to_the_operator_address(tmp_path: Path) -> None:
    intake = intake_on(tmp_path, operator_address="ops@example.org")
    assert await accept_one(intake, [f"postmaster@{HOST}"]) == ["ops@example.org"]


@pytest.mark.asyncio
async def test_operator_address_must_be_an_address_off_the_engine(tmp_path: Path) -> None:
    for value, named in [("nobody", "not an e-mail address"),
                         ("postmaster@mta.localhost", "own names")]:
        path = tmp_path / "mta.toml"
        path.write_text(f'[engine]\noperator_address = "{value}"\n')
        with pytest.raises(ConfigError, match=named):
            load_config(path)
    # One at [engine] hostname would loop: it is ignored, the mail stays on the engine.
    intake = intake_on(tmp_path, operator_address=f"ops@{HOST}")
    assert await accept_one(intake, [f"postmaster@{HOST}"]) == [f"postmaster@{BOUNCE}"]


# --- the engine-wide AUTH limit, without sockets ------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.asyncio
async def test_auth_limit_counts_failures_and_attempts_in_progress(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", map_size=64 * 1024**2)
    committer = GroupCommitter(spool)
    committer.start()
    clock = Clock()
    limit = AuthLimit(spool, committer.submit, limit=3, window=300.0, clock=clock)
    try:
        first = await limit.reserve("192.0.2.1")
        second = await limit.reserve("192.0.2.1")
        assert first and second and first != second
        await limit.release("192.0.2.1", first, failed=True)
        assert limit.failures("192.0.2.1") == 1
        third = await limit.reserve("192.0.2.1")  # 1 failure + 2 in progress: full
        assert third
        waiting = asyncio.ensure_future(limit.reserve("192.0.2.1"))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        await limit.release("192.0.2.1", second, failed=False)  # a success frees its place
        assert await asyncio.wait_for(waiting, 2) is not None
        await limit.release("192.0.2.1", third, failed=True)
        await limit.release("192.0.2.1", waiting.result(), failed=True)
        assert limit.failures("192.0.2.1") == 3
        assert await limit.reserve("192.0.2.1") is None  # locked out
        assert limit.failures("192.0.2.2") == 0  # another address is not
        clock.now += 301  # the failures are past the window
        assert limit.failures("192.0.2.1") == 0
        assert await limit.reserve("192.0.2.1")
        clock.now += RESERVATION_TTL + 1  # a worker that died left that one behind
        assert all([await limit.reserve("192.0.2.1") for _ in range(3)])
    finally:
        await committer.close()
        spool.close()


# --- over loopback SMTP ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("hostile")
    proc = start_engine(tmp, engine={"hostname": HOST}, smtp={
        "trusted_networks": ["127.0.0.1/32"], "greet_pause": 0.0,
        "max_junk_commands": JUNK_LIMIT, "idle_timeout": 30.0, "data_timeout": 60.0},
        bounce={"domain": BOUNCE})
    yield proc, tmp
    proc.stop()
    log = engine_log(tmp)
    assert "Traceback" not in log, log[-3000:]


def session(engine, source: str | None = None) -> RawSmtp:
    proc, _ = engine
    c = RawSmtp(proc.host, proc.port, source=source, timeout=60)
    c.greet()
    return c


def test_outsiders_report_streams_are_dropped_as_they_come(engine) -> None:
    """30 MiB streamed to the bounce domain by an outsider: 552 5.3.4 against the 1 MiB
    report limit (not the 25 MiB message limit), and the worker's memory stays flat."""
    proc, tmp = engine
    (pid,) = proc.worker_pids()
    before, base = spooled_ids(tmp / "spool"), proc_status(pid)["VmRSS"]
    c = session(engine, source=UNTRUSTED)
    c.send(f"MAIL FROM:<>\r\nRCPT TO:<b+x@{BOUNCE}>\r\nDATA\r\n".encode())
    assert [r[0] for r in replies(c, 3)] == [250, 250, 354]
    chunk = (b"r" * 1022 + b"\r\n") * 1024  # 1 MiB
    c.send(b"Subject: report\r\n\r\n")
    for _ in range(30):
        c.send(chunk)
    code, text = c.cmd(b".\r\n")
    assert (code, text) == (552, "5.3.4 Message too big (at most 1048576 bytes here)")
    peak = proc_status(pid)["VmHWM"]
    assert peak - base < 12_000, f"worker grew from {base} kB to a peak of {peak} kB"
    c.close()
    assert spooled_ids(tmp / "spool") == before


def test_a_2mib_report_is_refused_and_a_small_one_taken(engine) -> None:
    proc, tmp = engine
    before = spooled_ids(tmp / "spool")
    c = session(engine, source=UNTRUSTED)
    big = b"Subject: report\r\n\r\n" + (b"x" * 1022 + b"\r\n") * 2048
    c.send(f"MAIL FROM:<>\r\nRCPT TO:<fbl@{BOUNCE}>\r\nDATA\r\n".encode() + big + b".\r\n")
    got = replies(c, 4)
    assert [code for code, _ in got] == [250, 250, 354, 552] and got[3][1].startswith("5.3.4")
    assert spooled_ids(tmp / "spool") == before
    c.send(f"MAIL FROM:<>\r\nRCPT TO:<fbl@{BOUNCE}>\r\nDATA\r\n".encode() + MSG + b".\r\n")
    assert [r[0] for r in replies(c, 4)] == [250, 250, 354, 250]
    c.close()
    # A trusted client's 2 MiB message to the world is under the message limit.
    trusted = session(engine)
    trusted.send(b"MAIL FROM:<a@shop.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n" + big + b".\r\n")
    assert [r[0] for r in replies(trusted, 4)] == [250, 250, 354, 250]
    trusted.close()
    assert len(spooled_ids(tmp / "spool") - before) == 2


def send_campaign(engine, value: bytes) -> tuple[int, str]:
    c = session(engine)
    c.send(b"MAIL FROM:<a@shop.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n")
    assert [r[0] for r in replies(c, 3)] == [250, 250, 354]
    code, text = c.cmd(b"X-Campaign-ID: " + value + b"\r\n" + MSG + b".\r\n")
    assert c.cmd("NOOP")[0] == 250  # the session goes on
    c.close()
    return code, text


@pytest.mark.parametrize("name", sorted(HOSTILE_NAMES))
def test_hostile_campaign_names_are_refused_at_intake(engine, name: str) -> None:
    _, tmp = engine
    value, problem = HOSTILE_NAMES[name]
    before = spooled_ids(tmp / "spool")
    assert send_campaign(engine, value) == (550, f"5.6.0 X-Campaign-ID: {problem}")
    assert spooled_ids(tmp / "spool") == before


@pytest.mark.parametrize("value", [b"spring\rsale", b"spring\nsale", b"spring\r\rsale"])
def test_bare_cr_or_lf_in_a_campaign_name_refuses_the_whole_message(engine, value: bytes) -> None:
    _, tmp = engine
    before = spooled_ids(tmp / "spool")
    code, text = send_campaign(engine, value)
    assert code == 550 and text.startswith("5.5.2"), text
    assert spooled_ids(tmp / "spool") == before


def test_a_name_of_128_characters_is_stored_whole(engine) -> None:
    _, tmp = engine
    before = spooled_ids(tmp / "spool")
    assert send_campaign(engine, b"n" * 128)[0] == 250
    (stored,) = new_messages(tmp / "spool", before)
    assert stored["campaign"] == "n" * 128


def test_two_campaign_fields_are_refused(engine) -> None:
    _, tmp = engine
    before = spooled_ids(tmp / "spool")
    code, text = send_campaign(engine, b"spring\r\nX-Campaign-ID: autumn")
    assert (code, text) == (550, "5.6.0 X-Campaign-ID: appears 2 times; a message belongs "
                                 "to one campaign")
    assert spooled_ids(tmp / "spool") == before


def test_mail_for_the_engines_own_names(engine) -> None:
    """Outsiders reach postmaster and abuse at the engine's own names, nobody else there;
    trusted clients neither (and still relay elsewhere). The mail stays on the engine."""
    _, tmp = engine
    before = spooled_ids(tmp / "spool")
    c = session(engine, source=UNTRUSTED)
    assert c.cmd("MAIL FROM:<someone@remote.test>")[0] == 250
    for rcpt in ["anyone@mx.shop.test", "root@MX.SHOP.TEST", "anyone@localhost",
                 "a@x.localhost", "anyone@[127.0.0.1]", "anyone@[IPv6:::1]"]:
        code, text = c.cmd(f"RCPT TO:<{rcpt}>")
        assert code == 550 and text.startswith("5.1.1"), (rcpt, text)
    for rcpt in ["<postmaster@mx.shop.test>", "<Postmaster@MX.shop.test>", "<postmaster>",
                 "<abuse@mx.shop.test>"]:
        assert c.cmd(f"RCPT TO:{rcpt}")[0] == 250, rcpt
    assert c.cmd("DATA")[0] == 354
    assert c.cmd(b"Subject: hello postmaster\r\n\r\nhi\r\n.\r\n")[0] == 250
    c.close()
    (stored,) = new_messages(tmp / "spool", before)
    assert stored["rcpts"] == [f"postmaster@{BOUNCE}", f"abuse@{BOUNCE}"]
    trusted = session(engine)
    assert trusted.cmd("MAIL FROM:<a@shop.test>")[0] == 250
    code, text = trusted.cmd("RCPT TO:<anyone@mx.shop.test>")
    assert (code, text) == (550, "5.1.1 <anyone@mx.shop.test>: no such mailbox here")
    assert trusted.cmd("RCPT TO:<b@dest.test>")[0] == 250
    trusted.close()


def test_noop_forever_is_cut_off(engine) -> None:
    c = session(engine, source=UNTRUSTED)
    for line in ["NOOP", "RSET", "HELP", "EHLO again.test", "VRFY <a@b.test>"] * 2:
        assert c.cmd(line)[0] in (250, 214, 252), line
    code, text = c.cmd("NOOP")
    assert (code, text) == (421, f"4.7.0 {HOST} Too many commands that send no mail, closing")
    assert c.closed()
    trusted = session(engine)
    assert all(trusted.cmd("NOOP")[0] == 250 for _ in range(3 * JUNK_LIMIT))
    trusted.close()


def test_postmaster_mail_is_kept_for_the_operator_never_relayed(tmp_path: Path) -> None:
    proc = start_engine(tmp_path, engine={"hostname": HOST}, smtp={"greet_pause": 0.0},
                        bounce={"domain": BOUNCE, "unparsed_dir": str(tmp_path / "unparsed")},
                        delivery={"enabled": True})
    try:
        c = RawSmtp(proc.host, proc.port, source=UNTRUSTED)
        c.greet()
        c.send(f"MAIL FROM:<someone@remote.test>\r\nRCPT TO:<postmaster@{HOST}>\r\n"
               "DATA\r\n".encode() + b"Subject: hello postmaster\r\n\r\nhi\r\n.\r\n")
        assert [r[0] for r in replies(c, 4)] == [250, 250, 354, 250]
        c.close()
        assert wait_until(lambda: read_events(tmp_path / "events.jsonl", "Unparsed"), 15)
    finally:
        proc.stop()
    [kept] = read_events(tmp_path / "events.jsonl", "Unparsed")
    assert kept["to"] == f"postmaster@{BOUNCE}" and kept["kept"] is True
    [eml] = (tmp_path / "unparsed").glob("*.eml")
    assert b"hello postmaster" in eml.read_bytes()
    assert f"for <postmaster@{HOST}>".encode() in eml.read_bytes()
    kinds = {e["type"] for e in read_events(tmp_path / "events.jsonl")}
    assert not kinds & {"Delivery", "TransientFailure", "Bounce"}, kinds


# --- AUTH failures per engine: two workers -------------------------------------------------------

AUTH_LIMIT = 4


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("auth2")
    proc = start_engine(tmp, workers=2, smtp={
        "trusted_networks": ["127.0.0.1/32", "127.0.1.0/24"], "greet_pause": 0.0,
        "max_auth_failures": AUTH_LIMIT, "auth_failure_window": 300.0},
        accounts=[{"name": "shop", "password_hash": hash_password("shop-pw", log_n=10)}])
    yield proc, tmp
    proc.stop()
    log = engine_log(tmp)
    assert "Traceback" not in log, log[-3000:]


def worker_of(tmp: Path, sender: str) -> int | None:
    """The worker that took the message from `sender`, once its Reception event is in."""
    events = read_events(tmp / "events.jsonl", "Reception")
    return next((e["worker"] for e in events if e["sender"] == sender), None)


def one_session_per_worker(proc, tmp: Path, ip: str) -> dict[int, RawSmtp]:
    """Open sessions from `ip` until one sits on each worker: each sends a message whose
    sender names it, and its Reception event says which worker took it."""
    found: dict[int, RawSmtp] = {}
    for i in range(80):
        c = RawSmtp(proc.host, proc.port, source=ip)
        c.greet()
        sender = f"probe-{ip}-{i}@shop.test"
        c.send(f"MAIL FROM:<{sender}>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n".encode()
               + MSG + b".\r\n")
        assert [r[0] for r in replies(c, 4)] == [250, 250, 354, 250]
        assert wait_until(lambda s=sender: worker_of(tmp, s) is not None)
        index = worker_of(tmp, sender)
        if index in found:
            c.close()
            continue
        found[index] = c
        if len(found) == 2:
            return found
    raise AssertionError("every connection landed on the same worker")


def auth_events(tmp: Path, ip: str) -> list[dict]:
    return [e for e in read_events(tmp / "events.jsonl", "Auth") if e.get("client") == ip]


def test_auth_failures_are_limited_for_the_engine_not_per_worker(two_workers) -> None:
    """Guesses alternate between a session on each worker: the address gets the limit's
    worth in all, then 421 on both."""
    proc, tmp = two_workers
    ip = "127.0.1.20"
    sessions = one_session_per_worker(proc, tmp, ip)
    codes = []
    for attempt in range(3 * AUTH_LIMIT):
        code, text = sessions[attempt % 2].cmd(f"AUTH PLAIN {plain('shop', f'guess{attempt}')}")
        codes.append(code)
        if code == 421:
            break
    assert codes == [535] * AUTH_LIMIT + [421], codes
    other = sessions[(AUTH_LIMIT + 1) % 2]
    assert other.cmd(f"AUTH PLAIN {plain('shop', 'shop-pw')}")[0] == 421
    assert wait_until(lambda: len(auth_events(tmp, ip)) >= AUTH_LIMIT)
    checked = auth_events(tmp, ip)
    assert len(checked) == AUTH_LIMIT and not any(e["ok"] for e in checked)
    assert {e["worker"] for e in checked} == {0, 1}
    fresh = RawSmtp(proc.host, proc.port, source=ip)
    fresh.greet()
    assert fresh.cmd(f"AUTH PLAIN {plain('shop', 'shop-pw')}")[0] == 421
    for c in (*sessions.values(), fresh):
        c.close()


def test_parallel_guesses_on_every_worker_get_the_limit_and_no_more(two_workers) -> None:
    proc, tmp = two_workers
    ip = "127.0.1.21"
    conns = [RawSmtp(proc.host, proc.port, source=ip) for _ in range(12)]
    for c in conns:
        c.greet()
    failures = 0
    while conns:
        for i, c in enumerate(conns):
            c.send(f"AUTH PLAIN {plain('shop', f'guess-{i}')}\r\n".encode())
        codes = [c.reply()[0] for c in conns]
        assert set(codes) <= {535, 421}, codes
        failures += codes.count(535)
        for c, code in zip(list(conns), codes, strict=True):
            if code == 421:
                c.close()
                conns.remove(c)
    assert failures == AUTH_LIMIT
    time.sleep(0.3)
    assert len(auth_events(tmp, ip)) == AUTH_LIMIT
    # The right password from elsewhere still works.
    ok = RawSmtp(proc.host, proc.port, source="127.0.1.22")
    ok.greet()
    assert ok.cmd(f"AUTH PLAIN {plain('shop', 'shop-pw')}")[0] == 235
    ok.close()
