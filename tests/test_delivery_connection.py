"""The outbound SMTP client over loopback (mta/delivery/connection.py): Postfix's smtp-sink,
our asyncio sink with its faults, and a recording server that shows what arrives in
each packet. Pipelining is used when offered and only then."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bench.rig.sinks import Close, MessageIn, Reply, SinkFaults, SinkSession, StartTls
from mta.delivery.connection import ConnectFailure, Connection, ConnectSettings, Target, connect
from mta.delivery.protocol import prepare_data

T = TypeVar("T")
SENDER = "news@shop.test"
DATA = (b"From: <news@shop.test>\r\nSubject: dots\r\n\r\n.leading dot\r\n..two\r\n.\r\n"
        b"last line\r\n")


@pytest.fixture(params=["uvloop", "asyncio"])
def run(request: pytest.FixtureRequest) -> Iterator[Callable[[Awaitable[T]], T]]:
    """Run a coroutine on uvloop (as the engine does) and on the plain asyncio loop."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        yield lambda coro: runner.run(coro)  # type: ignore[arg-type]


def settings(port: int, **overrides: Any) -> ConnectSettings:
    values: dict[str, Any] = {"port": port, "helo": "client.test", "connect_timeout": 2.0,
                              "command_timeout": 3.0, **overrides}
    return ConnectSettings(**values)


async def open_one(host: str, port: int, **overrides: Any) -> Connection:
    conn, failures = await connect([Target(f"mx.{host}.test", host)], settings(port, **overrides))
    assert conn is not None, failures
    assert failures == []
    return conn


def codes(results: list[Any]) -> list[tuple[str, int, str, bool]]:
    return [(r.recipient, r.code, r.enhanced, r.possible_duplicate) for r in results]


# --- Postfix smtp-sink -------------------------------------------------------------


def test_pipelined_transactions_with_smtp_sink(run, smtp_sink_factory) -> None:
    sink = smtp_sink_factory(host="127.0.0.2", capture=True)

    async def session() -> list[int]:
        conn = await open_one(sink.host, sink.port)
        assert conn.pipelining and conn.target.address == "127.0.0.2"
        writes = []
        for i in range(3):
            before = conn.protocol.writes
            results = await conn.send(SENDER, [f"a{i}@dest.test", f"b{i}@dest.test"], DATA)
            assert [r.code for r in results] == [250, 250] and conn.usable
            assert results[0].mx == "mx.127.0.0.2.test"
            writes.append(conn.protocol.writes - before)
        assert conn.sent == 3
        await conn.close()
        return writes

    # MAIL, both RCPTs and DATA in one write; the message in a second: two turns each.
    assert run(session()) == [2, 2, 2]
    assert sink.wait_for(messages=3, sessions=1)
    assert sink.quits == 1
    captured = sink.captured()
    assert [m.rcpt_tos for m in captured] == [(f"<a{i}@dest.test>", f"<b{i}@dest.test>")
                                              for i in range(3)]
    assert captured[0].data.endswith(DATA)  # dot-stuffed on the wire, unstuffed at the sink
    assert captured[0].mail_from.startswith(f"<{SENDER}>")


def test_one_command_at_a_time_when_pipelining_is_not_offered(run, smtp_sink_factory) -> None:
    sink = smtp_sink_factory(host="127.0.0.2", pipelining=False, capture=True)

    async def session() -> int:
        conn = await open_one(sink.host, sink.port)
        assert not conn.pipelining
        before = conn.protocol.writes
        results = await conn.send(SENDER, ["a@dest.test", "b@dest.test"], DATA)
        assert [r.code for r in results] == [250, 250]
        await conn.close()
        return conn.protocol.writes - before - 1  # QUIT

    assert run(session()) == 5  # MAIL, RCPT, RCPT, DATA, the message
    assert sink.wait_for(messages=1, sessions=1)
    assert sink.captured()[0].data.endswith(DATA)


def test_refused_recipients_then_the_next_message(run, smtp_sink_factory) -> None:
    sink = smtp_sink_factory(host="127.0.0.2", hard_reject=["rcpt"])

    async def session() -> tuple[list[Any], list[Any], bool]:
        conn = await open_one(sink.host, sink.port)
        first = await conn.send(SENDER, ["a@dest.test", "b@dest.test"], DATA)
        second = await conn.send(SENDER, ["c@dest.test"], DATA)  # RSET first
        usable = conn.usable
        await conn.close()
        return first, second, usable

    first, second, usable = run(session())
    assert codes(first) == [("a@dest.test", 500, "5.3.0", False),
                            ("b@dest.test", 500, "5.3.0", False)]
    assert codes(second) == [("c@dest.test", 500, "5.3.0", False)] and usable
    assert sink.wait_for(sessions=1) and sink.messages == 0


def test_421_at_rcpt_closes_the_connection(run, smtp_sink_factory) -> None:
    sink = smtp_sink_factory(host="127.0.0.2", close_421=["rcpt"])

    async def session() -> tuple[list[Any], bool]:
        conn = await open_one(sink.host, sink.port)
        results = await conn.send(SENDER, ["a@dest.test", "b@dest.test"], DATA)
        usable = conn.usable
        await conn.close()
        return results, usable

    results, usable = run(session())
    assert [r.code for r in results] == [421, 421] and not usable
    assert not any(r.possible_duplicate for r in results)


def test_connection_dropped_after_the_dot(run, smtp_sink_factory) -> None:
    sink = smtp_sink_factory(host="127.0.0.2", disconnect=["."])

    async def session() -> tuple[list[Any], bool]:
        conn = await open_one(sink.host, sink.port)
        results = await conn.send(SENDER, ["a@dest.test", "b@dest.test"], DATA)
        return results, conn.usable

    results, usable = run(session())
    assert codes(results) == [("a@dest.test", 0, "4.4.2", True), ("b@dest.test", 0, "4.4.2", True)]
    assert "after the message was sent" in results[0].text and not usable


def test_timeout_waiting_for_the_reply_to_the_dot(run, smtp_sink_factory) -> None:
    sink = smtp_sink_factory(host="127.0.0.2", delays={".": 2})

    async def session() -> tuple[list[Any], bool]:
        conn = await open_one(sink.host, sink.port, command_timeout=0.5)
        results = await conn.send(SENDER, ["a@dest.test"], DATA)
        return results, conn.usable

    results, usable = run(session())
    assert codes(results) == [("a@dest.test", 0, "4.4.2", True)]
    assert "timed out" in results[0].text and not usable


def test_connect_falls_through_to_the_next_target(run, smtp_sink_factory) -> None:
    up = smtp_sink_factory(host="127.0.0.2")
    busy = smtp_sink_factory(host="127.0.0.3", port=up.port, close_421=["connect"])
    targets = [Target("down.test", "127.0.0.4"), Target("busy.test", "127.0.0.3"),
               Target("up.test", "127.0.0.2")]

    async def session() -> tuple[Connection | None, list[ConnectFailure]]:
        conn, failures = await connect(targets, settings(up.port))
        if conn is not None:
            await conn.close()
        return conn, failures

    conn, failures = run(session())
    assert conn is not None and conn.target.host == "up.test"
    assert [(f.target.host, f.code, f.enhanced[:1]) for f in failures] == [
        ("down.test", 0, "4"), ("busy.test", 421, "4")]
    assert "cannot connect to down.test [127.0.0.4]" in failures[0].text
    assert busy.wait_for(sessions=1)


# --- our asyncio sink ----------------------------------------------------------------------


def test_per_recipient_results_and_reset_between_transactions(run, asyncio_sink_factory) -> None:
    faults = SinkFaults(rcpt_rules=[("gone", "550 5.1.1 no such user"),
                                    ("full", "452 4.2.2 mailbox full")])
    sink = asyncio_sink_factory(host="127.0.0.2", faults=faults)

    async def session() -> list[list[Any]]:
        conn = await open_one(sink.host, sink.port)
        out = [await conn.send(SENDER, ["ok@d.test", "gone@d.test", "full@d.test"], DATA),
               await conn.send(SENDER, ["gone2@d.test"], DATA),  # every recipient refused
               await conn.send(SENDER, ["next@d.test"], DATA)]  # RSET, then as usual
        await conn.close()
        return out

    first, refused, after = run(session())
    assert codes(first) == [("ok@d.test", 250, "2.0.0", False),
                            ("gone@d.test", 550, "5.1.1", False),
                            ("full@d.test", 452, "4.2.2", False)]
    assert codes(refused) == [("gone2@d.test", 550, "5.1.1", False)]
    assert codes(after) == [("next@d.test", 250, "2.0.0", False)]
    assert sink.wait_for(messages=2)
    assert [m.rcpt_tos for m in sink.received] == [("ok@d.test",), ("next@d.test",)]
    assert sink.received[0].data == DATA and sink.sessions == 1


def test_data_and_mail_refused(run, asyncio_sink_factory) -> None:
    faults = SinkFaults(data_reply="554 5.7.1 rejected by policy")
    sink = asyncio_sink_factory(host="127.0.0.2", faults=faults)

    async def session() -> list[list[Any]]:
        conn = await open_one(sink.host, sink.port)
        out = [await conn.send(SENDER, ["a@d.test", "b@d.test"], DATA)]
        faults.data_reply, faults.mail_reply = "", "451 4.3.0 not now"
        out.append(await conn.send(SENDER, ["c@d.test", "d@d.test"], DATA))
        faults.mail_reply = ""
        out.append(await conn.send(SENDER, ["e@d.test"], DATA))
        assert conn.usable
        await conn.close()
        return out

    data_refused, mail_refused, fine = run(session())
    assert codes(data_refused) == [("a@d.test", 554, "5.7.1", False),
                                   ("b@d.test", 554, "5.7.1", False)]
    assert codes(mail_refused) == [("c@d.test", 451, "4.3.0", False),
                                   ("d@d.test", 451, "4.3.0", False)]
    assert codes(fine) == [("e@d.test", 250, "2.0.0", False)]
    assert sink.wait_for(messages=1) and sink.received[0].rcpt_tos == ("e@d.test",)


def test_dropped_after_the_dot_may_duplicate(run, asyncio_sink_factory) -> None:
    sink = asyncio_sink_factory(host="127.0.0.2", faults=SinkFaults(drop_after_dot=True))

    async def session() -> list[Any]:
        conn = await open_one(sink.host, sink.port)
        return await conn.send(SENDER, ["a@d.test"], DATA)

    assert codes(run(session())) == [("a@d.test", 0, "4.4.2", True)]
    assert sink.wait_for(messages=1)  # it did arrive


@pytest.mark.parametrize("greeting", ["421 4.3.2 busy", "554 5.7.1 go away"])
def test_greeting_refused(run, asyncio_sink_factory, greeting: str) -> None:
    sink = asyncio_sink_factory(host="127.0.0.2", faults=SinkFaults(greeting=greeting))

    async def session() -> tuple[Connection | None, list[ConnectFailure]]:
        return await connect([Target("mx.test", sink.host)], settings(sink.port))

    conn, failures = run(session())
    assert conn is None
    assert [(f.code, f.enhanced, f.text) for f in failures] == [
        (int(greeting[:3]), greeting[4:9], greeting[4:])]


def test_source_address(run, asyncio_sink_factory) -> None:
    sink = asyncio_sink_factory(host="127.0.0.2")

    async def session() -> None:
        conn = await open_one(sink.host, sink.port, source_address="127.0.0.7")
        await conn.send(SENDER, ["a@d.test"], DATA)
        await conn.close()

    run(session())
    assert sink.wait_for(messages=1) and sink.received[0].peer.startswith("127.0.0.7:")


def test_cancelled_mid_transaction_drops_the_connection(run, asyncio_sink_factory) -> None:
    sink = asyncio_sink_factory(host="127.0.0.2", faults=SinkFaults(dot_delay=2.0))

    async def session() -> bool:
        conn = await open_one(sink.host, sink.port)
        task = asyncio.ensure_future(conn.send(SENDER, ["a@d.test"], DATA))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return conn.usable

    assert run(session()) is False


# --- STARTTLS ---------------------------------------------------------------------------


def server_tls(directory: Path) -> ssl.SSLContext:
    """A server context with a fresh self-signed certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sink.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    return context


@pytest.mark.parametrize("required", [False, True])
def test_starttls(run, asyncio_sink_factory, tmp_path: Path, required: bool) -> None:
    sink = asyncio_sink_factory(host="127.0.0.2", tls=server_tls(tmp_path))

    async def session() -> tuple[bool, dict[str, str], list[Any]]:
        conn = await open_one(sink.host, sink.port, tls_required=required)
        results = await conn.send(SENDER, ["a@d.test"], DATA)
        await conn.close()
        return conn.tls, conn.extensions, results

    tls, extensions, results = run(session())
    assert tls and "STARTTLS" not in extensions and "PIPELINING" in extensions  # EHLO again
    assert [r.code for r in results] == [250]
    assert sink.wait_for(messages=1) and sink.received[0].tls


def test_tls_required_but_not_offered(run, asyncio_sink_factory) -> None:
    sink = asyncio_sink_factory(host="127.0.0.2")

    async def session() -> tuple[Connection | None, list[ConnectFailure]]:
        return await connect([Target("mx.test", sink.host)],
                             settings(sink.port, tls_required=True))

    conn, failures = run(session())
    assert conn is None and [(f.code, f.enhanced) for f in failures] == [(0, "4.7.10")]
    assert "does not offer STARTTLS" in failures[0].text
    assert sink.messages == 0


# --- a recording server: what arrives in each packet -------------------------------------


class ScriptedSession(SinkSession):
    """SinkSession with a few more ways to be difficult."""

    def __init__(self, *, pipelining: bool = True, ehlo: str = "", helo: str = "",
                 **kw: Any) -> None:
        super().__init__(SinkFaults(greeting=kw.pop("greeting", "")), **kw)
        self.pipelining, self.ehlo_reply, self.helo_reply = pipelining, ehlo, helo

    def _ehlo(self, argument: str) -> list[Any]:
        if self.ehlo_reply:
            return [Reply(self.ehlo_reply)]
        events = super()._ehlo(argument)
        if not self.pipelining:
            events = [Reply(events[0].text.replace("250-PIPELINING\r\n", ""))]
        return events

    def _helo(self, argument: str) -> list[Any]:
        return [Reply(self.helo_reply)] if self.helo_reply else super()._helo(argument)


class Recorder(asyncio.Protocol):
    """Serves a ScriptedSession; keeps every chunk received. After STARTTLS, the client's
    handshake is answered with bytes that are not TLS at all."""

    def __init__(self, server: RecordingServer) -> None:
        self.server = server
        self.session = ScriptedSession(tls_available=server.offer_tls, **server.options)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.server.connections.append(self)
        self._run(self.session.start())

    def data_received(self, data: bytes) -> None:
        self.server.chunks.append(data)
        if self.session.tls_active:  # the ClientHello: answer with something else, or not
            assert self.transport is not None
            if not self.server.silent_tls:
                self.transport.write(b"this is not a TLS handshake\r\n")
            return
        self._run(self.session.feed(data))

    def _run(self, events: list[Any]) -> None:
        assert self.transport is not None
        for event in events:
            if isinstance(event, Reply):
                self.transport.write(event.text.encode() + b"\r\n")
            elif isinstance(event, Close):
                self.transport.close()
            elif isinstance(event, StartTls):
                self.session.tls_active = True
            elif isinstance(event, MessageIn):
                self.server.messages.append(event)


class RecordingServer:
    def __init__(self, offer_tls: bool = False, silent_tls: bool = False,
                 **options: Any) -> None:
        self.offer_tls = offer_tls
        self.silent_tls = silent_tls
        self.options = options
        self.chunks: list[bytes] = []
        self.messages: list[MessageIn] = []
        self.connections: list[Recorder] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> RecordingServer:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: Recorder(self), "127.0.0.2", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for connection in self.connections:
            if connection.transport is not None:
                connection.transport.abort()


@pytest.mark.parametrize("pipelining", [True, False])
def test_what_the_server_receives_per_packet(run, pipelining: bool) -> None:
    async def session() -> list[bytes]:
        async with RecordingServer(pipelining=pipelining) as server:
            conn = await open_one("127.0.0.2", server.port)
            assert conn.pipelining is pipelining
            server.chunks.clear()
            results = await conn.send(SENDER, ["a@d.test", "b@d.test"], DATA)
            assert [r.code for r in results] == [250, 250]
            assert server.messages[0].rcpt_tos == ("a@d.test", "b@d.test")
            await conn.close()
            return server.chunks

    chunks = run(session())
    commands = (b"MAIL FROM:<news@shop.test> SIZE=%d\r\nRCPT TO:<a@d.test>\r\n"
                b"RCPT TO:<b@d.test>\r\nDATA\r\n" % len(DATA))
    if pipelining:
        assert chunks[0] == commands  # one packet: MAIL, both RCPTs and DATA
    else:
        assert chunks[:4] == commands.splitlines(keepends=True)
    assert chunks[-1] == b"QUIT\r\n"


def test_the_next_transaction_goes_out_with_the_message_before_it(run) -> None:
    """RFC 2920 3.1: the message may begin a pipelined group: the next MAIL, RCPT and
    DATA travel with it, while the reply to the message is still to come."""
    async def session() -> tuple[list[bytes], list[list[Any]]]:
        async with RecordingServer(pipelining=True) as server:
            conn = await open_one("127.0.0.2", server.port)
            server.chunks.clear()
            first = await conn.submit(SENDER, ["a@d.test"], DATA)
            assert not first.done() and conn.usable  # its reply is still to come
            second = await conn.submit(SENDER, ["b@d.test"], DATA)
            results = [await first, await second]
            await conn.close()
            assert [m.rcpt_tos for m in server.messages] == [("a@d.test",), ("b@d.test",)]
            return server.chunks, results

    chunks, results = run(session())
    assert [[r.code for r in each] for each in results] == [[250], [250]]
    body = prepare_data(DATA)
    second_commands = b"MAIL FROM:<news@shop.test> SIZE=%d\r\nRCPT TO:<b@d.test>\r\nDATA\r\n" % len(DATA)
    assert body + second_commands in chunks  # one packet: the message, then the next commands
    assert chunks[-2:] == [body, b"QUIT\r\n"]


def test_421_to_a_message_with_the_next_transaction_pipelined(run, asyncio_sink_factory) -> None:
    """The next transaction's commands were sent, its message was not: it is deferred
    (4.4.2), never taken for a possible duplicate."""
    sink = asyncio_sink_factory(host="127.0.0.2",
                                faults=SinkFaults(dot_reply="421 4.7.0 too many messages"))

    async def session() -> tuple[list[Any], list[Any], bool]:
        conn = await open_one(sink.host, sink.port)
        first = await conn.submit(SENDER, ["a@d.test"], DATA)
        second = await conn.submit(SENDER, ["b@d.test"], DATA)
        return await first, await second, conn.usable

    first, second, usable = run(session())
    assert codes(first) == [("a@d.test", 421, "4.7.0", False)]
    assert [(r.code, r.enhanced, r.possible_duplicate) for r in second] == [(0, "4.4.2", False)]
    assert not usable


def test_ehlo_refused_falls_back_to_helo(run) -> None:
    async def session() -> tuple[dict[str, str], list[Any], list[bytes]]:
        async with RecordingServer(ehlo="502 5.5.2 Error: command not recognized") as server:
            conn = await open_one("127.0.0.2", server.port)
            results = await conn.send(SENDER, ["a@d.test"], DATA)
            await conn.close()
            return conn.extensions, results, server.chunks

    extensions, results, chunks = run(session())
    assert extensions == {} and [r.code for r in results] == [250]
    assert chunks[:3] == [b"EHLO client.test\r\n", b"HELO client.test\r\n",
                          b"MAIL FROM:<news@shop.test>\r\n"]  # no SIZE, no pipelining


def test_helo_refused_too(run) -> None:
    async def session() -> list[ConnectFailure]:
        async with RecordingServer(ehlo="500 5.5.1 no", helo="550 5.7.1 not you") as server:
            conn, failures = await connect([Target("mx.test", "127.0.0.2")],
                                           settings(server.port))
            assert conn is None
            return failures

    assert [(f.code, f.enhanced) for f in run(session())] == [(550, "5.7.1")]


@pytest.mark.parametrize("silent", [False, True])
def test_tls_handshake_failure_is_a_connect_failure(run, silent: bool) -> None:
    async def session() -> list[ConnectFailure]:
        async with RecordingServer(offer_tls=True, silent_tls=silent) as server:
            conn, failures = await connect([Target("mx.test", "127.0.0.2")],
                                           settings(server.port, connect_timeout=0.5))
            assert conn is None
            return failures

    (failure,) = run(session())
    assert failure.code == 0 and "TLS handshake with mx.test [127.0.0.2] failed" in failure.text
    assert ("longer than" if silent else "WRONG_VERSION_NUMBER") in failure.text


def test_over_long_greeting(run) -> None:
    async def session() -> list[ConnectFailure]:
        async with RecordingServer(greeting="220 " + "x" * 20000) as server:
            conn, failures = await connect([Target("mx.test", "127.0.0.2")],
                                           settings(server.port))
            assert conn is None
            return failures

    (failure,) = run(session())
    assert failure.code == 0 and "bad reply" in failure.text and "longer" in failure.text


def test_unsolicited_reply_makes_the_connection_unusable(run) -> None:
    async def session() -> tuple[bool, bool, list[Any]]:
        async with RecordingServer() as server:
            conn = await open_one("127.0.0.2", server.port)
            before = conn.usable
            transport = server.connections[0].transport
            assert transport is not None
            transport.write(b"421 4.4.2 idle too long\r\n")
            for _ in range(100):
                if not conn.usable:
                    break
                await asyncio.sleep(0.01)
            writes = conn.protocol.writes
            results = await conn.send(SENDER, ["a@d.test"], DATA)
            assert conn.protocol.writes == writes  # nothing sent on an out-of-step session
            await conn.close()
            return before, conn.usable, results

    before, after, results = run(session())
    assert before and not after
    assert codes(results) == [("a@d.test", 0, "4.4.2", False)]


def test_client_speed_bench_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import client_speed

    client_speed.main(["--messages", "40", "--sessions", "4", "--rounds", "1"])
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert set(rows) == {"aiosmtplib", "ours", "ours-nopipe"}
    assert all(row[2] == "0" for row in rows.values())  # nothing failed
