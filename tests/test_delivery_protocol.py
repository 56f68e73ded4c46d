"""The SMTP client's protocol logic without sockets: the reply parser and the transaction
state machine (mta/delivery/protocol.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mta.delivery.protocol import (
    ProtocolError,
    Reply,
    ReplyParser,
    Transaction,
    parse_ehlo,
    prepare_data,
)

PIPELINING = {"PIPELINING": "", "8BITMIME": "", "SIZE": "1000000", "SMTPUTF8": ""}
PLAIN: dict[str, str] = {}
DATA = b"Subject: hi\r\n\r\nbody\r\n"


def r(text: str) -> Reply:
    """A reply from its wire form, e.g. '250 2.1.0 Ok' or '250-a\\r\\n250 b'."""
    (reply,) = ReplyParser().feed(text.encode() + b"\r\n")
    return reply


# --- replies ---------------------------------------------------------------------


class TestReplyParser:
    def test_single_and_multi_line(self) -> None:
        parser = ReplyParser()
        replies = parser.feed(b"220 mx.test ESMTP\r\n250-mx.test\r\n250-PIPELINING\r\n250 SIZE 10\r\n")
        assert replies == [Reply(220, ("mx.test ESMTP",)),
                           Reply(250, ("mx.test", "PIPELINING", "SIZE 10"))]
        assert replies[1].text == "mx.test\nPIPELINING\nSIZE 10"
        assert str(replies[0]) == "220 mx.test ESMTP" and not parser.pending

    def test_pipelined_replies_come_out_in_order(self) -> None:
        wire = b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 no such user\r\n354 go ahead\r\n"
        codes = [reply.code for reply in ReplyParser().feed(wire)]
        assert codes == [250, 250, 550, 354]

    @given(st.lists(st.integers(min_value=0, max_value=120), max_size=8))
    def test_split_anywhere(self, cuts: list[int]) -> None:
        wire = b"250-first\r\n250 second\r\n451 4.3.0 later\r\n354 data\n221 bye\r\n"
        parser = ReplyParser()
        replies: list[Reply] = []
        last = 0
        for cut in sorted({min(c, len(wire)) for c in cuts}) + [len(wire)]:
            replies += parser.feed(wire[last:cut])
            last = cut
        assert [(x.code, x.lines) for x in replies] == [
            (250, ("first", "second")), (451, ("4.3.0 later",)), (354, ("data",)),
            (221, ("bye",))]
        assert parser.error is None and not parser.pending

    def test_code_without_text_and_bare_lf(self) -> None:
        assert ReplyParser().feed(b"250\n354\r\n") == [Reply(250, ("",)), Reply(354, ("",))]

    def test_utf8_text(self) -> None:
        (reply,) = ReplyParser().feed("550 5.1.1 unbekannt: müller\r\n".encode())
        assert reply.text == "5.1.1 unbekannt: müller"

    def test_pending_and_clear(self) -> None:
        parser = ReplyParser()
        assert parser.feed(b"250-one\r\n250 tw") == [] and parser.pending
        parser.clear()
        assert not parser.pending
        assert parser.feed(b"220 fresh\r\n") == [Reply(220, ("fresh",))]

    @pytest.mark.parametrize("line", [
        b"hello\r\n", b"25\r\n", b"2500 x\r\n", b"250:x\r\n", b"150 x\r\n", b"650 x\r\n",
        b"abc def\r\n", b"\r\n",
    ])
    def test_bad_lines_are_protocol_errors(self, line: bytes) -> None:
        parser = ReplyParser()
        assert parser.feed(b"250 ok\r\n" + line + b"250 later\r\n") == [Reply(250, ("ok",))]
        assert isinstance(parser.error, ProtocolError)
        assert parser.feed(b"250 ignored\r\n") == []  # nothing after an error is trusted

    def test_code_change_within_a_reply(self) -> None:
        parser = ReplyParser()
        assert parser.feed(b"250-a\r\n550 b\r\n") == []
        assert "changed" in str(parser.error)

    def test_over_long_line_with_and_without_line_end(self) -> None:
        parser = ReplyParser(max_line=100)
        assert parser.feed(b"250 " + b"x" * 200) == []
        assert "longer" in str(parser.error)
        parser = ReplyParser(max_line=100)
        assert parser.feed(b"250 ok\r\n250 " + b"x" * 200 + b"\r\n") == [Reply(250, ("ok",))]
        assert "longer" in str(parser.error)

    def test_over_long_reply(self) -> None:
        parser = ReplyParser(max_reply=1000)
        assert parser.feed(b"250-" + b"x" * 50 + b"\r\n") == []
        assert parser.feed(b"".join(b"250-" + b"x" * 50 + b"\r\n" for _ in range(30))) == []
        assert "reply longer" in str(parser.error) and not parser.pending

    def test_long_lines_in_small_pieces_are_bounded(self) -> None:
        parser = ReplyParser(max_line=100)
        for _ in range(50):
            parser.feed(b"x" * 10)
        assert parser.error is not None and not parser.pending


def test_parse_ehlo() -> None:
    reply = r("250-mx.test greets you\r\n250-pipelining\r\n250-SIZE 35882577\r\n"
              "250-AUTH PLAIN LOGIN\r\n250-STARTTLS\r\n250 8BITMIME")
    assert parse_ehlo(reply) == {"PIPELINING": "", "SIZE": "35882577", "AUTH": "PLAIN LOGIN",
                                 "STARTTLS": "", "8BITMIME": ""}
    assert parse_ehlo(r("250 mx.test")) == {}


class TestPrepareData:
    def test_dot_stuffing(self) -> None:
        data = b".starts\r\nmid\r\n.\r\n..two\r\nend.\r\n"
        assert prepare_data(data) == b"..starts\r\nmid\r\n..\r\n...two\r\nend.\r\n.\r\n"

    def test_final_line_end_added(self) -> None:
        assert prepare_data(b"no end") == b"no end\r\n.\r\n"
        assert prepare_data(b"") == b".\r\n"

    def test_bare_cr_and_lf_become_crlf(self) -> None:
        # No end-of-data smuggling: "\n.\n" and "\r.\r" are not left for a server to misread.
        assert prepare_data(b"a\n.\nb\r.\rc\r\n") == b"a\r\n..\r\nb\r\n..\r\nc\r\n.\r\n"

    def test_clean_data_is_not_rewritten(self) -> None:
        data = b"x" * 100 + b"\r\n"
        assert prepare_data(data) == data + b".\r\n"


# --- transactions ------------------------------------------------------------------


def run(tx: Transaction, replies: list[str]) -> list[bytes]:
    """Feed replies in order; what the transaction wrote after each one."""
    written = []
    for text in replies:
        assert not tx.done
        written.append(tx.receive(r(text)))
    assert tx.done
    return written


def outcome(tx: Transaction) -> list[tuple[str, int, str, bool]]:
    return [(x.recipient, x.code, x.enhanced, x.possible_duplicate) for x in tx.results()]


class TestPipelined:
    def test_one_write_then_the_message_after_354(self) -> None:
        tx = Transaction("s@a.test", ["x@b.test", "y@b.test"], DATA, extensions=PIPELINING,
                         mx="mx.b.test")
        assert tx.start() == (b"MAIL FROM:<s@a.test> SIZE=21\r\nRCPT TO:<x@b.test>\r\n"
                              b"RCPT TO:<y@b.test>\r\nDATA\r\n")
        written = run(tx, ["250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok", "354 go",
                           "250 2.0.0 queued as 1"])
        assert written == [b"", b"", b"", DATA + b".\r\n", b""]
        assert outcome(tx) == [("x@b.test", 250, "2.0.0", False), ("y@b.test", 250, "2.0.0", False)]
        assert tx.results()[0].mx == "mx.b.test" and tx.results()[0].text == "2.0.0 queued as 1"
        assert not tx.close and not tx.needs_reset and tx.data_written

    def test_per_recipient_results(self) -> None:
        tx = Transaction("s@a.test", ["ok@b.test", "gone@b.test", "full@b.test", "ok2@b.test"],
                         DATA, extensions=PIPELINING)
        tx.start()
        run(tx, ["250 Ok", "250 Ok", "550 5.1.1 no such user", "452 4.2.2 mailbox full",
                 "250 Ok", "354 go", "250 2.0.0 queued"])
        assert outcome(tx) == [("ok@b.test", 250, "2.0.0", False),
                               ("gone@b.test", 550, "5.1.1", False),
                               ("full@b.test", 452, "4.2.2", False),
                               ("ok2@b.test", 250, "2.0.0", False)]

    def test_all_refused_then_the_next_transaction_resets_first(self) -> None:
        tx = Transaction("s@a.test", ["x@b.test"], DATA, extensions=PIPELINING)
        tx.start()
        assert run(tx, ["250 Ok", "550 5.1.1 unknown", "554 5.5.1 no valid recipients"]) == [
            b"", b"", b""]
        assert outcome(tx) == [("x@b.test", 550, "5.1.1", False)]
        assert tx.needs_reset and not tx.close and not tx.data_written
        nxt = Transaction("s@a.test", ["y@b.test"], DATA, extensions=PIPELINING,
                          reset_first=True)
        assert nxt.start().startswith(b"RSET\r\nMAIL FROM:")
        run(nxt, ["250 2.0.0 Ok", "250 Ok", "250 Ok", "354 go", "250 queued"])
        assert outcome(nxt) == [("y@b.test", 250, "2.0.0", False)]

    def test_354_without_recipients_gets_a_lone_dot(self) -> None:
        tx = Transaction("s@a.test", ["x@b.test"], DATA, extensions=PIPELINING)
        tx.start()
        written = run(tx, ["250 Ok", "550 5.1.1 unknown", "354 go", "554 5.5.1 no recipients"])
        assert written == [b"", b"", b".\r\n", b""]
        assert outcome(tx) == [("x@b.test", 550, "5.1.1", False)] and not tx.data_written

    def test_mail_refused_waits_for_the_other_replies(self) -> None:
        tx = Transaction("s@a.test", ["x@b.test", "y@b.test"], DATA, extensions=PIPELINING)
        tx.start()
        run(tx, ["451 4.3.0 not now", "503 5.5.1 need MAIL", "503 5.5.1 need MAIL",
                 "503 5.5.1 need RCPT"])
        assert outcome(tx) == [("x@b.test", 451, "4.3.0", False),
                               ("y@b.test", 451, "4.3.0", False)]
        assert not tx.needs_reset and not tx.close

    def test_data_refused(self) -> None:
        tx = Transaction("s@a.test", ["x@b.test", "bad@b.test"], DATA, extensions=PIPELINING)
        tx.start()
        run(tx, ["250 Ok", "250 Ok", "550 5.1.1 unknown", "554 5.7.1 policy"])
        assert outcome(tx) == [("x@b.test", 554, "5.7.1", False),
                               ("bad@b.test", 550, "5.1.1", False)]
        assert tx.needs_reset and not tx.data_written

    def test_421_at_a_recipient_closes(self) -> None:
        tx = Transaction("s@a.test", ["a@b.test", "b@b.test", "c@b.test"], DATA,
                         extensions=PIPELINING)
        tx.start()
        run(tx, ["250 Ok", "550 5.1.1 unknown", "421 4.7.0 bye"])
        assert outcome(tx) == [("a@b.test", 550, "5.1.1", False),
                               ("b@b.test", 421, "4.7.0", False),
                               ("c@b.test", 421, "4.7.0", False)]
        assert tx.close

    def test_421_to_the_message(self) -> None:
        tx = Transaction("s@a.test", ["a@b.test"], DATA, extensions=PIPELINING)
        tx.start()
        run(tx, ["250 Ok", "250 Ok", "354 go", "421 4.3.2 shutting down"])
        assert outcome(tx) == [("a@b.test", 421, "4.3.2", False)] and tx.close

    def test_lost_before_the_message(self) -> None:
        tx = Transaction("s@a.test", ["a@b.test", "b@b.test"], DATA, extensions=PIPELINING)
        tx.start()
        tx.receive(r("250 Ok"))
        tx.receive(r("550 5.1.1 unknown"))
        tx.lost("connection lost")
        assert outcome(tx) == [("a@b.test", 550, "5.1.1", False),
                               ("b@b.test", 0, "4.4.2", False)]
        assert tx.close and tx.done

    def test_lost_after_the_message_may_duplicate(self) -> None:
        tx = Transaction("s@a.test", ["a@b.test", "b@b.test"], DATA, extensions=PIPELINING)
        tx.start()
        for text in ["250 Ok", "250 Ok", "550 5.1.1 unknown", "354 go"]:
            tx.receive(r(text))
        assert tx.data_written
        tx.lost("connection lost after the message was sent")
        assert outcome(tx) == [("a@b.test", 0, "4.4.2", True), ("b@b.test", 550, "5.1.1", False)]

    @pytest.mark.parametrize("replies", [
        ["250 Ok", "250 Ok", "250 2.0.0 what?"],  # DATA answered 250
        ["250 Ok", "250 Ok", "354 go", "354 again?"],  # the message answered 354
    ])
    def test_unexpected_replies_close_the_connection(self, replies: list[str]) -> None:
        tx = Transaction("s@a.test", ["a@b.test"], DATA, extensions=PIPELINING)
        tx.start()
        run(tx, replies)
        (result,) = tx.results()
        assert result.code == 0 and result.enhanced == "4.4.2" and tx.close
        assert "unexpected reply" in result.text

    def test_reply_after_the_end_is_an_error(self) -> None:
        tx = Transaction("s@a.test", ["a@b.test"], DATA, extensions=PLAIN)
        tx.start()
        tx.receive(r("550 5.7.1 go away"))
        with pytest.raises(ProtocolError):
            tx.receive(r("250 Ok"))


class TestOneCommandAtATime:
    def test_each_command_waits_for_its_reply(self) -> None:
        tx = Transaction("s@a.test", ["x@b.test", "y@b.test"], DATA, extensions=PLAIN)
        assert tx.start() == b"MAIL FROM:<s@a.test>\r\n"
        written = run(tx, ["250 Ok", "550 5.1.1 unknown", "250 Ok", "354 go", "250 queued"])
        assert written == [b"RCPT TO:<x@b.test>\r\n", b"RCPT TO:<y@b.test>\r\n", b"DATA\r\n",
                           DATA + b".\r\n", b""]
        assert outcome(tx) == [("x@b.test", 550, "5.1.1", False), ("y@b.test", 250, "2.0.0", False)]

    def test_mail_refused_ends_at_once(self) -> None:
        tx = Transaction("s@a.test", ["x@b.test"], DATA, extensions=PLAIN)
        tx.start()
        run(tx, ["550 5.7.1 sender refused"])
        assert outcome(tx) == [("x@b.test", 550, "5.7.1", False)] and not tx.needs_reset

    def test_no_data_when_every_recipient_is_refused(self) -> None:
        tx = Transaction("s@a.test", ["x@b.test"], DATA, extensions=PLAIN)
        tx.start()
        assert run(tx, ["250 Ok", "550 5.1.1 unknown"]) == [b"RCPT TO:<x@b.test>\r\n", b""]
        assert tx.needs_reset
        nxt = Transaction("s@a.test", ["y@b.test"], DATA, extensions=PLAIN, reset_first=True)
        assert nxt.start() == b"RSET\r\n"
        assert run(nxt, ["250 Ok", "250 Ok", "250 Ok", "354 go", "250 queued"])[0] == (
            b"MAIL FROM:<s@a.test>\r\n")

    def test_421_at_mail(self) -> None:
        tx = Transaction("s@a.test", ["x@b.test"], DATA, extensions=PLAIN)
        tx.start()
        run(tx, ["421 4.7.0 too many connections"])
        assert outcome(tx) == [("x@b.test", 421, "4.7.0", False)] and tx.close


class TestParametersAndAddresses:
    def test_size_8bitmime_smtputf8(self) -> None:
        data = "Subject: grüße\r\n\r\n".encode()
        tx = Transaction("s@a.test", ["müller@b.test"], data, extensions=PIPELINING)
        assert tx.start() == (f"MAIL FROM:<s@a.test> SIZE={len(data)} BODY=8BITMIME SMTPUTF8"
                              "\r\nRCPT TO:<müller@b.test>\r\nDATA\r\n").encode()

    def test_null_sender(self) -> None:
        tx = Transaction("", ["x@b.test"], DATA, extensions=PLAIN)
        assert tx.start() == b"MAIL FROM:<>\r\n"

    def test_no_smtputf8_at_the_server(self) -> None:
        tx = Transaction("s@a.test", ["müller@b.test", "x@b.test"], DATA, extensions=PLAIN)
        assert tx.start() == b"MAIL FROM:<s@a.test>\r\n"
        run(tx, ["250 Ok", "250 Ok", "354 go", "250 queued"])
        assert outcome(tx) == [("müller@b.test", 553, "5.6.7", False),
                               ("x@b.test", 250, "2.0.0", False)]
        sender = Transaction("jürgen@a.test", ["x@b.test"], DATA, extensions=PLAIN)
        assert sender.start() == b"" and sender.done
        assert outcome(sender) == [("x@b.test", 553, "5.6.7", False)]

    @pytest.mark.parametrize("bad", ["x@b.test>\r\nRSET", "x@b.test\nDATA", "x y@b.test",
                                     "<x@b.test>", "x\x00@b.test", ""])
    def test_addresses_that_would_inject_commands_are_never_written(self, bad: str) -> None:
        tx = Transaction("s@a.test", [bad, "ok@b.test"], DATA, extensions=PIPELINING)
        start = tx.start()
        assert start.count(b"\r\n") == 3 and b"<" + bad.encode() + b">" not in start
        run(tx, ["250 Ok", "250 Ok", "354 go", "250 queued"])
        assert outcome(tx) == [(bad, 501, "5.1.3", False), ("ok@b.test", 250, "2.0.0", False)]
        sender = Transaction("s@a.test\r\nRSET", ["x@b.test"], DATA, extensions=PIPELINING,
                             reset_first=True)
        assert sender.start() == b"" and outcome(sender) == [("x@b.test", 501, "5.1.7", False)]
        assert sender.needs_reset  # the reset still owed is not forgotten

    def test_duplicate_recipients_each_get_a_result(self) -> None:
        tx = Transaction("s@a.test", ["x@b.test", "x@b.test"], DATA, extensions=PIPELINING)
        tx.start()
        run(tx, ["250 Ok", "250 Ok", "452 4.5.3 duplicate", "354 go", "250 queued"])
        assert [x.code for x in tx.results()] == [250, 452]

    def test_start_twice_is_a_bug(self) -> None:
        tx = Transaction("s@a.test", ["x@b.test"], DATA, extensions=PLAIN)
        tx.start()
        with pytest.raises(RuntimeError):
            tx.start()
        with pytest.raises(RuntimeError):
            tx.results()
