"""The loopback rig: the DNS server, Postfix smtp-sink, and our asyncio sink.

Clients are dnspython (DNS) and aiosmtplib (SMTP), on 127.0.0.x only.
"""

from __future__ import annotations

import asyncio
import datetime
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import dns.flags
import dns.message
import dns.nameserver
import dns.query
import dns.rcode
import dns.resolver
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from dnslib import QTYPE, RCODE, DNSRecord

from bench.rig.dns import DnsServer, ZoneStore, add_bench_domains, answer_query, split_txt
from bench.rig.sinks import (
    AsyncioSink,
    AsyncioSinkProcess,
    Close,
    MessageIn,
    Reply,
    SinkFaults,
    SinkSession,
    SmtpSink,
    SmtpSinkOptions,
    StartTls,
    envelope_address,
    faults_from_json,
    faults_to_json,
    memory_dir,
    parse_capture,
    parse_counters,
    smtp_sink_command,
    start_smtp_sinks,
)

MESSAGE = b"Subject: rig test\r\n\r\n.a line starting with a dot\r\nbody\r\n"
SinkFactory = Callable[..., Any]


# --- DNS ----------------------------------------------------------------------


def stub(server: DnsServer, lifetime: float = 1.0) -> dns.resolver.Resolver:
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver(server.host, server.port)]
    resolver.lifetime = lifetime
    return resolver


def ask(server: DnsServer, name: str, rtype: str, *, tcp: bool = False) -> dns.message.Message:
    query = dns.message.make_query(name, rtype)
    send = dns.query.tcp if tcp else dns.query.udp
    return send(query, server.host, port=server.port, timeout=2)


class TestDnsAnswers:
    def test_records_with_ttls(self, dns_server: DnsServer) -> None:
        dns_server.add_mx("d.test", [(10, "mx1.d.test"), (20, "mx2.d.test.")], ttl=120)
        dns_server.add_a("mx1.d.test", "127.0.0.2", "127.0.0.3", ttl=60)
        dns_server.add_aaaa("mx1.d.test", "::1")
        resolver = stub(dns_server)
        mx = resolver.resolve("d.test.", "MX")
        assert sorted((r.preference, r.exchange.to_text()) for r in mx) == [
            (10, "mx1.d.test."), (20, "mx2.d.test.")
        ]
        assert mx.rrset.ttl == 120
        a = resolver.resolve("mx1.d.test.", "A")
        assert sorted(r.address for r in a) == ["127.0.0.2", "127.0.0.3"]
        assert a.rrset.ttl == 60
        assert [r.address for r in resolver.resolve("mx1.d.test.", "AAAA")] == ["::1"]

    def test_null_mx(self, dns_server: DnsServer) -> None:
        dns_server.add_mx("null.test", [(0, ".")])
        (record,) = stub(dns_server).resolve("null.test.", "MX")
        assert (record.preference, record.exchange.to_text()) == (0, ".")

    def test_long_txt_is_split_and_reassembled(self, dns_server: DnsServer) -> None:
        key = "v=DKIM1; k=rsa; p=" + "A" * 600
        dns_server.add_txt("sel._domainkey.d.test", key)
        (record,) = stub(dns_server).resolve("sel._domainkey.d.test.", "TXT")
        assert all(len(s) <= 255 for s in record.strings)
        assert b"".join(record.strings).decode() == key
        assert split_txt("") == [b""]

    def test_cname_is_chased_within_the_data(self, dns_server: DnsServer) -> None:
        dns_server.add_cname("alias.test", "real.test")
        dns_server.add_a("real.test", "127.0.0.9")
        answer = stub(dns_server).resolve("alias.test.", "A")
        assert answer.canonical_name.to_text() == "real.test."
        assert [r.address for r in answer] == ["127.0.0.9"]

    def test_nxdomain_and_nodata_carry_the_soa(self, dns_server: DnsServer) -> None:
        dns_server.add_zone("d.test", negative_ttl=42)
        dns_server.add_a("www.sub.d.test", "127.0.0.2")
        missing = ask(dns_server, "nope.d.test", "A")
        assert missing.rcode() == dns.rcode.NXDOMAIN
        assert missing.authority[0][0].minimum == 42
        assert missing.authority[0].name.to_text() == "d.test."
        nodata = ask(dns_server, "www.sub.d.test", "MX")
        assert (nodata.rcode(), nodata.answer) == (dns.rcode.NOERROR, [])
        assert nodata.authority[0][0].minimum == 42
        empty_non_terminal = ask(dns_server, "sub.d.test", "A")
        assert empty_non_terminal.rcode() == dns.rcode.NOERROR

    def test_names_outside_served_zones_are_refused(self) -> None:
        with DnsServer(zones=["test"]) as server:
            assert ask(server, "example.com", "A").rcode() == dns.rcode.REFUSED
            assert ask(server, "x.test", "A").rcode() == dns.rcode.NXDOMAIN

    def test_removed_records_are_gone(self, dns_server: DnsServer) -> None:
        dns_server.add_a("h.test", "127.0.0.2")
        dns_server.add_mx("h.test", [(10, "mx.test")])
        dns_server.remove("h.test", "A")
        assert ask(dns_server, "h.test", "A").rcode() == dns.rcode.NOERROR
        assert ask(dns_server, "h.test", "A").answer == []
        dns_server.remove("h.test")
        assert ask(dns_server, "h.test", "MX").rcode() == dns.rcode.NXDOMAIN

    def test_tcp_and_truncation(self, dns_server: DnsServer) -> None:
        dns_server.add_a("big.test", *(f"127.0.1.{i}" for i in range(60)))
        over_udp = ask(dns_server, "big.test", "A")  # no EDNS: 512-byte limit
        assert over_udp.flags & dns.flags.TC
        assert over_udp.answer == []
        over_tcp = ask(dns_server, "big.test", "A", tcp=True)
        assert len(over_tcp.answer[0]) == 60
        assert len(stub(dns_server).resolve("big.test.", "A")) == 60  # resolver falls back to TCP

    def test_answer_query_without_sockets(self) -> None:
        store = ZoneStore()
        store.add_zone("")
        store.set_fault("down.test", "timeout")
        assert answer_query(store, DNSRecord.question("down.test", "MX")) is None
        reply = answer_query(store, DNSRecord.question("unknown.test", "MX"))
        assert reply is not None and reply.header.rcode == RCODE.NXDOMAIN
        assert reply.auth[0].rtype == QTYPE.SOA


class TestDnsFaults:
    def test_servfail_and_timeout_switch_at_run_time(self, dns_server: DnsServer) -> None:
        dns_server.add_mx("d.test", [(10, "mx.d.test")])
        assert ask(dns_server, "d.test", "MX").rcode() == dns.rcode.NOERROR
        dns_server.fail("d.test", "servfail")
        assert ask(dns_server, "d.test", "MX").rcode() == dns.rcode.SERVFAIL
        dns_server.fail("d.test", "timeout")
        with pytest.raises(dns.exception.Timeout):
            dns.query.udp(dns.message.make_query("d.test", "MX"), dns_server.host,
                          port=dns_server.port, timeout=0.2)
        with pytest.raises(dns.exception.Timeout):
            dns.query.tcp(dns.message.make_query("d.test", "MX"), dns_server.host,
                          port=dns_server.port, timeout=0.2)
        dns_server.fail("d.test", None)
        assert ask(dns_server, "d.test", "MX").answer

    def test_fault_per_type(self, dns_server: DnsServer) -> None:
        dns_server.add_a("h.test", "127.0.0.2")
        dns_server.fail("h.test", "servfail", rtype="AAAA")
        assert ask(dns_server, "h.test", "AAAA").rcode() == dns.rcode.SERVFAIL
        assert ask(dns_server, "h.test", "A").rcode() == dns.rcode.NOERROR

    def test_unknown_fault_is_refused(self, dns_server: DnsServer) -> None:
        with pytest.raises(ValueError):
            dns_server.fail("h.test", "refused")  # type: ignore[arg-type]

    def test_query_count_and_log(self, dns_server: DnsServer) -> None:
        dns_server.fail("t.test", "timeout")
        ask(dns_server, "a.test", "A")
        ask(dns_server, "A.test.", "MX")
        with pytest.raises(dns.exception.Timeout):
            dns.query.udp(dns.message.make_query("t.test", "A"), dns_server.host,
                          port=dns_server.port, timeout=0.1)
        assert dns_server.query_count == 3
        assert (dns_server.count("a.test"), dns_server.count("a.test", "mx")) == (2, 1)
        dns_server.reset_counts()
        assert dns_server.query_count == 0


def test_bench_domains_spread_over_four_mx(dns_server: DnsServer) -> None:
    routes = add_bench_domains(dns_server, 100)
    assert len(routes) == 100
    assert sorted(set(routes.values())) == ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
    assert list(routes.values()).count("127.0.0.2") == 25
    resolver = stub(dns_server)
    for domain in ("d0000.bench.test", "d0099.bench.test"):
        (mx,) = resolver.resolve(domain + ".", "MX")
        (a,) = resolver.resolve(mx.exchange, "A")
        assert a.address == routes[domain]


# --- SMTP clients ----------------------------------------------------------------


async def send_session(
    host: str, port: int, messages: int = 1, rcpts: tuple[str, ...] = ("rcpt@dest.test",),
    timeout: float = 5.0, **client: Any,
) -> list[tuple[dict[str, Any], str]]:
    """One SMTP session sending `messages` copies of MESSAGE."""
    smtp = aiosmtplib.SMTP(hostname=host, port=port, timeout=timeout,
                           start_tls=client.pop("start_tls", False), **client)
    await smtp.connect()
    results = [await smtp.sendmail("sender@src.test", list(rcpts), MESSAGE)
               for _ in range(messages)]
    await smtp.quit()
    return results


def send(host: str, port: int, **kw: Any) -> list[tuple[dict[str, Any], str]]:
    return asyncio.run(send_session(host, port, **kw))


# --- Postfix smtp-sink ------------------------------------------------------------


class TestSmtpSinkPlain:
    def test_command_line(self) -> None:
        options = SmtpSinkOptions(hard_reject=["RCPT"], soft_reject=["mail"],
                                  disconnect=["."], close_421=["connect"],
                                  delays={".": 2, "DATA": 1}, hard_reply="550 5.1.1 no",
                                  pipelining=False, hostname="mx.test")
        argv = smtp_sink_command("127.0.0.2", 2525, options, capture_file="/x/m", user="nobody")
        assert argv[:2] == ["/usr/sbin/smtp-sink", "-c"]
        pairs = list(zip(argv, argv[1:], strict=False))
        for pair in [("-f", "rcpt"), ("-r", "mail"), ("-q", "."), ("-Q", "connect"),
                     ("-W", ".:2"), ("-W", "data:1"), ("-B", "550 5.1.1 no"),
                     ("-h", "mx.test"), ("-D", "/x/m"), ("-u", "nobody")]:
            assert pair in pairs
        assert "-p" in argv
        assert argv[-2:] == ["inet:127.0.0.2:2525", "256"]

    @pytest.mark.parametrize("options", [
        {"hard_reject": ["FROB"]}, {"delays": {".": 0}}, {"hard_reply": "450 no"},
        {"soft_reply": "550 no"},
    ])
    def test_bad_options_are_refused(self, options: dict[str, Any]) -> None:
        with pytest.raises(ValueError):
            smtp_sink_command("127.0.0.2", 25, SmtpSinkOptions(**options))

    def test_counter_parsing(self) -> None:
        assert parse_counters(b"sess=0 quit=0 msg=1\rsess=1 quit=1 msg=2\r") == (1, 1, 2)
        assert parse_counters(b"sess=3 quit=2 mesg=7\r") == (3, 2, 7)
        assert parse_counters(b"") is None

    def test_capture_parsing(self) -> None:
        raw = (b"\x01\x02RIG-SINK-MESSAGE\x02\x01\nX-Client-Addr: 127.0.0.1\n"
               b"X-Client-Proto: ESMTP\nX-Helo-Args: me\nX-Mail-Args: <a@b>\n"
               b"X-Rcpt-Args: <c@d>\nX-Rcpt-Args: <e@f>\nReceived: from me\n\tby x;\n\tdate\n"
               b"Subject: s\n\nbody\n\n")
        (message,) = parse_capture(raw)
        assert (message.mail_from, message.rcpt_tos, message.helo) == (
            "<a@b>", ("<c@d>", "<e@f>"), "me")
        assert message.data == b"Subject: s\r\n\r\nbody\r\n"


class TestSmtpSink:
    def test_counts_messages_and_sessions(self, smtp_sink_factory: SinkFactory) -> None:
        sink: SmtpSink = smtp_sink_factory("127.0.0.2")
        send(sink.host, sink.port, messages=3)
        send(sink.host, sink.port, messages=2)
        assert sink.wait_for(messages=5, sessions=2, timeout=5)
        assert (sink.messages, sink.sessions, sink.quits) == (5, 2, 2)

    def test_capture_keeps_envelope_and_data(self, smtp_sink_factory: SinkFactory) -> None:
        sink: SmtpSink = smtp_sink_factory("127.0.0.3", capture=True)
        send(sink.host, sink.port, rcpts=("a@dest.test", "b@dest.test"))
        assert sink.wait_for(messages=1)
        (message,) = sink.captured()
        assert message.mail_from.startswith("<sender@src.test>")
        assert [r.split()[0] for r in message.rcpt_tos] == ["<a@dest.test>", "<b@dest.test>"]
        assert message.data == MESSAGE
        # kept in memory where the machine has room (its per-message temporary files
        # cost a disk file system as much CPU as the MTA under test)
        assert sink.capture_file is not None
        where = memory_dir()
        if where is not None:
            assert sink.capture_file.is_relative_to(where)

    def test_hard_and_soft_recipient_rejects(self, smtp_sink_factory: SinkFactory) -> None:
        hard: SmtpSink = smtp_sink_factory("127.0.0.2", hard_reject=["RCPT"])
        soft: SmtpSink = smtp_sink_factory("127.0.0.3", soft_reject=["RCPT"],
                                           soft_reply="451 4.7.1 greylisted")
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as hard_error:
            send(hard.host, hard.port)
        assert hard_error.value.recipients[0].code == 500
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as soft_error:
            send(soft.host, soft.port)
        assert soft_error.value.recipients[0].code == 451
        assert "greylisted" in soft_error.value.recipients[0].message
        assert hard.messages == soft.messages == 0

    def test_421_on_connect(self, smtp_sink_factory: SinkFactory) -> None:
        sink: SmtpSink = smtp_sink_factory("127.0.0.4", close_421=["connect"])
        with pytest.raises(aiosmtplib.SMTPConnectResponseError) as error:
            send(sink.host, sink.port)
        assert error.value.code == 421

    def test_drop_after_final_dot(self, smtp_sink_factory: SinkFactory) -> None:
        sink: SmtpSink = smtp_sink_factory("127.0.0.5", disconnect=["."])
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            send(sink.host, sink.port)
        assert sink.wait_for(messages=1, sessions=1)  # the data arrived all the same

    def test_hard_reject_of_the_final_dot(self, smtp_sink_factory: SinkFactory) -> None:
        sink: SmtpSink = smtp_sink_factory("127.0.0.2", hard_reject=["."],
                                           hard_reply="554 5.7.1 spam")
        with pytest.raises(aiosmtplib.SMTPDataError) as error:
            send(sink.host, sink.port)
        assert (error.value.code, error.value.message) == (554, "5.7.1 spam")

    def test_delayed_reply_to_the_dot(self, smtp_sink_factory: SinkFactory) -> None:
        slow: SmtpSink = smtp_sink_factory("127.0.0.2", delays={".": 1})
        fast: SmtpSink = smtp_sink_factory("127.0.0.3")
        assert send(fast.host, fast.port, timeout=0.5)[0][1].startswith("2.0.0")
        with pytest.raises(aiosmtplib.SMTPTimeoutError):
            send(slow.host, slow.port, timeout=0.5)

    def test_several_sinks_on_one_port(self) -> None:
        hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
        sinks = start_smtp_sinks(hosts)
        try:
            assert len({s.port for s in sinks}) == 1
            for sink in sinks:
                send(sink.host, sink.port)
            assert all(s.wait_for(messages=1) for s in sinks)
        finally:
            for sink in sinks:
                sink.stop()


# --- our asyncio sink: the session without sockets ----------------------------------


def texts(events: list[Any]) -> list[str]:
    return [e.text.split(" ", 1)[0] if isinstance(e, Reply) else type(e).__name__ for e in events]


class TestSinkSession:
    def test_pipelined_transaction_in_one_read(self) -> None:
        session = SinkSession(SinkFaults())
        assert texts(session.start()) == ["220"]
        events = session.feed(b"EHLO c\r\nMAIL FROM:<a@b> SIZE=10\r\nRCPT TO:<c@d>\r\n"
                              b"RCPT TO:<e@f>\r\nDATA\r\n..x\r\nbody\r\n.\r\nQUIT\r\n")
        assert texts(events) == ["250-sink.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8"
                                 "\r\n250-ENHANCEDSTATUSCODES\r\n250", "250", "250", "250",
                                 "354", "MessageIn", "250", "221", "Close"]
        message = events[5]
        assert message == MessageIn("a@b", ("c@d", "e@f"), b".x\r\nbody\r\n", accepted=True)

    def test_data_split_anywhere(self) -> None:
        stream = b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<c@d>\r\nDATA\r\nline\r\n.\r\nNOOP\r\n"
        for cut in range(1, len(stream)):
            session = SinkSession(SinkFaults())
            events = session.feed(stream[:cut]) + session.feed(stream[cut:])
            messages = [e for e in events if isinstance(e, MessageIn)]
            assert [m.data for m in messages] == [b"line\r\n"], cut
            assert texts(events)[-1] == "250"

    def test_empty_message_and_sequence_errors(self) -> None:
        session = SinkSession(SinkFaults())
        assert texts(session.feed(b"RCPT TO:<a@b>\r\nDATA\r\nFROB\r\n")) == ["503", "503", "502"]
        events = session.feed(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n.\r\n")
        assert [e.data for e in events if isinstance(e, MessageIn)] == [b""]
        assert texts(session.feed(b"X" * 5000)) == ["500"]

    def test_recipient_rules(self) -> None:
        faults = SinkFaults(rcpt_rules=[("^temp", "451 4.2.0 later"),
                                        (r"@gone\.test$", "550 5.1.1 unknown")])
        session = SinkSession(faults)
        events = session.feed(b"MAIL FROM:<a@b>\r\nRCPT TO:<TEMP1@x.test>\r\n"
                              b"RCPT TO:<u@gone.test>\r\nRCPT TO:<ok@x.test>\r\nDATA\r\nx\r\n.\r\n")
        assert texts(events) == ["250", "451", "550", "250", "354", "MessageIn", "250"]
        assert next(e for e in events if isinstance(e, MessageIn)).rcpt_tos == ("ok@x.test",)

    def test_421_greeting_and_421_replies_close(self) -> None:
        assert texts(SinkSession(SinkFaults(greeting="421 4.3.2 busy")).start()) == ["421", "Close"]
        session = SinkSession(SinkFaults(mail_reply="421 4.3.2 bye"))
        assert texts(session.feed(b"MAIL FROM:<a@b>\r\nNOOP\r\n")) == ["421", "Close"]

    def test_dot_faults(self) -> None:
        transaction = b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nx\r\n.\r\n"
        dropped = SinkSession(SinkFaults(drop_after_dot=True)).feed(transaction + b"NOOP\r\n")
        assert texts(dropped)[-2:] == ["MessageIn", "Close"]
        delayed = SinkSession(SinkFaults(dot_delay=1.5)).feed(transaction)
        assert delayed[-1] == Reply("250 2.0.0 Ok: queued as 1", delay=1.5)
        failed = SinkSession(SinkFaults(dot_reply="452 4.3.1 full")).feed(transaction)
        assert not next(e for e in failed if isinstance(e, MessageIn)).accepted
        assert texts(failed)[-1] == "452"

    def test_starttls_discards_what_was_sent_with_it(self) -> None:
        session = SinkSession(SinkFaults(), tls_available=True)
        events = session.feed(b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<evil@x>\r\n")
        assert "STARTTLS" in events[0].text
        assert events[1:] == [Reply("220 2.0.0 Ready to start TLS"), StartTls()]
        session.tls_started()
        assert "STARTTLS" not in session.feed(b"EHLO c\r\n")[0].text
        assert texts(session.feed(b"RCPT TO:<a@b>\r\n")) == ["503"]

    def test_helpers(self) -> None:
        assert envelope_address("FROM:<a@b> SIZE=10") == "a@b"
        assert envelope_address("TO: <c@d>") == "c@d"
        assert envelope_address("FROM:<>") == ""
        assert envelope_address("garbage") is None
        faults = SinkFaults(rcpt_rules=[("x", "550 no")], dot_delay=0.5)
        assert faults_from_json(faults_to_json(faults)) == faults
        assert isinstance(SinkSession(SinkFaults()).feed(b"QUIT\r\n")[-1], Close)


# --- our asyncio sink over sockets --------------------------------------------------


class TestAsyncioSink:
    def test_counts_and_records(self, asyncio_sink_factory: SinkFactory) -> None:
        sink: AsyncioSink = asyncio_sink_factory("127.0.0.2")
        send(sink.host, sink.port, messages=3)
        send(sink.host, sink.port, messages=1, rcpts=("x@dest.test", "y@dest.test"))
        assert sink.wait_for(messages=4, sessions=2)
        assert (sink.sessions, sink.messages, sink.accepted) == (2, 4, 4)
        last = sink.received[-1]
        assert (last.mail_from, last.rcpt_tos, last.data) == (
            "sender@src.test", ("x@dest.test", "y@dest.test"), MESSAGE)
        assert [m.session for m in sink.received] == [1, 1, 1, 2]
        assert last.peer.startswith("127.0.0.1:") and last.received_at > 0 and not last.tls
        sink.reset()
        assert (sink.messages, len(sink.received)) == (0, 0)

    def test_per_recipient_failures(self, asyncio_sink_factory: SinkFactory) -> None:
        faults = SinkFaults(rcpt_rules=[("^soft", "452 4.2.2 mailbox full"),
                                        ("^hard", "550 5.1.1 no such user")])
        sink: AsyncioSink = asyncio_sink_factory("127.0.0.3", faults=faults)
        ((errors, reply),) = send(sink.host, sink.port,
                                  rcpts=("soft@dest.test", "hard@dest.test", "ok@dest.test"))
        assert {r: e.code for r, e in errors.items()} == {"soft@dest.test": 452,
                                                          "hard@dest.test": 550}
        assert reply.startswith("2.0.0")
        assert sink.received[0].rcpt_tos == ("ok@dest.test",)

    def test_421_on_connect(self, asyncio_sink_factory: SinkFactory) -> None:
        sink: AsyncioSink = asyncio_sink_factory("127.0.0.4",
                                                 faults=SinkFaults(greeting="421 4.3.2 busy"))
        with pytest.raises(aiosmtplib.SMTPConnectResponseError) as error:
            send(sink.host, sink.port)
        assert error.value.code == 421
        assert (sink.sessions, sink.messages) == (1, 0)

    def test_drop_after_dot(self, asyncio_sink_factory: SinkFactory) -> None:
        sink: AsyncioSink = asyncio_sink_factory("127.0.0.5",
                                                 faults=SinkFaults(drop_after_dot=True))
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            send(sink.host, sink.port)
        assert sink.wait_for(messages=1)
        assert (sink.messages, sink.accepted) == (1, 0)
        assert sink.received[0].data == MESSAGE and not sink.received[0].accepted

    def test_delayed_dot_reply(self, asyncio_sink_factory: SinkFactory) -> None:
        sink: AsyncioSink = asyncio_sink_factory("127.0.0.2", faults=SinkFaults(dot_delay=0.6))
        with pytest.raises(aiosmtplib.SMTPTimeoutError):
            send(sink.host, sink.port, timeout=0.2)
        sink.faults.dot_delay = 0.0  # faults switch at run time
        assert send(sink.host, sink.port, timeout=0.2)[0][1].startswith("2.0.0")

    def test_faults_switch_at_run_time(self, asyncio_sink_factory: SinkFactory) -> None:
        sink: AsyncioSink = asyncio_sink_factory("127.0.0.3")
        send(sink.host, sink.port)
        sink.faults.dot_reply = "451 4.3.0 try again"
        with pytest.raises(aiosmtplib.SMTPDataError) as error:
            send(sink.host, sink.port)
        assert error.value.code == 451
        assert (sink.messages, sink.accepted) == (2, 1)

    def test_starttls(self, asyncio_sink_factory: SinkFactory, tmp_path: Path) -> None:
        sink: AsyncioSink = asyncio_sink_factory("127.0.0.4", tls=server_tls_context(tmp_path))
        send(sink.host, sink.port, start_tls=True, validate_certs=False)
        assert sink.wait_for(messages=1)
        assert sink.received[0].tls and sink.received[0].data == MESSAGE

    def test_inside_a_running_loop(self) -> None:
        async def scenario() -> tuple[int, int]:
            sink = await AsyncioSink("127.0.0.2").start_async()
            try:
                await send_session(sink.host, sink.port, messages=2)
                return sink.sessions, sink.messages
            finally:
                await sink.stop_async()

        assert asyncio.run(scenario()) == (1, 2)

    def test_separate_process(self) -> None:
        faults = SinkFaults(rcpt_rules=[("^no", "550 5.1.1 unknown")])
        with AsyncioSinkProcess("127.0.0.5", faults=faults) as sink:
            ((errors, _),) = send(sink.host, sink.port, messages=1,
                                  rcpts=("no@dest.test", "yes@dest.test"))
            send(sink.host, sink.port, messages=2)
            assert sink.wait_for(messages=3, sessions=2)
            assert (sink.sessions, sink.messages, sink.accepted) == (2, 3, 3)
        assert errors["no@dest.test"].code == 550


def server_tls_context(directory: Path) -> ssl.SSLContext:
    """A server context with a fresh self-signed certificate for 127.0.0.x."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sink.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context
