"""One SMTP transaction on one outbound connection, with per-recipient results.

The protocol logic lives in mta/delivery/protocol.py (a reply parser and a
transaction state machine, no sockets); this module is the I/O edge: an asyncio
Protocol (uvloop-friendly) that carries the bytes, `connect()` that opens a
connection to the first reachable address of a destination (greeting, EHLO or
HELO, opportunistic STARTTLS or required TLS), and `Connection.send()` that runs
one transaction with PIPELINING when the server offers it (RFC 2920: MAIL, every
RCPT and DATA in one write) and one command at a time when it does not.

TLS follows the destination's plan (mta/delivery/tls): each MX host's requirements,
and a checker that judges what the server showed after STARTTLS (the handshake never
verifies by itself). Once STARTTLS was sent to a host, the session never goes on in
plain text: a refused STARTTLS or a failed handshake fails that host.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import ssl
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol, cast

from mta.delivery.protocol import (
    LOST_STATUS,
    Reply,
    ReplyParser,
    Transaction,
    parse_ehlo,
)
from mta.delivery.tls.model import Check, HostPolicy, PeerInfo, TlsMode, TlsPlan, Verdict
from mta.delivery.tls.policy import judge, mode_policy
from mta.delivery.tls.service import handshake_context
from mta.queue.outcome import RcptResult, enhanced_status

QUIT_TIMEOUT = 5.0  # at most this long for the reply to QUIT when closing
# Errors binding the source address: that address is not (or no longer) this machine's.
LOCAL_ERRNOS = frozenset({errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT})


@dataclass(frozen=True)
class Target:
    host: str  # the MX host name (for logs and DSNs)
    address: str  # the IP address to connect to


class SessionChecker(Protocol):
    """Judges a session from what the server showed (mta.delivery.tls.service.TlsChecker)."""

    context: ssl.SSLContext

    def check(self, policy: HostPolicy, host: str, address: str, peer: PeerInfo,
              sending_ip: str = "") -> Verdict: ...


@dataclass(frozen=True)
class TlsRoute:
    """The TLS side of a destination: its plan and the checker of its sessions."""

    plan: TlsPlan
    checker: SessionChecker


@dataclass
class ConnectSettings:
    port: int
    helo: str
    connect_timeout: float
    command_timeout: float
    source_address: str = ""
    tls_required: bool = False  # without `tls`: TLS required, certificate not checked
    tls: TlsRoute | None = None


@dataclass
class ConnectFailure:
    target: Target
    code: int
    text: str
    enhanced: str
    tls: dict[str, Any] | None = None  # the session's TLS fields, for the events
    policy: bool = False  # refused by the TLS policy (not a sign of an unreachable host)
    local: bool = False  # the local (source) address could not be used: not the host's fault


class _Lost(Exception):
    """The connection is gone (closed, reset, or the server's replies went astray)."""


class SmtpProtocol(asyncio.Protocol):
    """Bytes to and from one server: replies parsed as they arrive and queued in order;
    `reply()` waits for the next one with a timeout. Counts writes (tests use this to
    see pipelining: one write for MAIL, every RCPT and DATA)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.parser = ReplyParser()
        self.replies: deque[Reply] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.error = ""  # why the connection cannot be used any more
        self.writes = 0
        self._waiter: asyncio.Future[None] | None = None
        self._held: list[bytes] = []  # written by write_soon, sent with the next write

    # --- asyncio callbacks ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        replies = self.parser.feed(data)
        if replies:
            self.replies.extend(replies)
        if self.parser.error is not None and not self.error:
            self.error = f"bad reply from the server: {self.parser.error}"
            if self.transport is not None:
                self.transport.abort()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.error:
            self.error = "connection lost" + (f" ({_describe(exc)})" if exc else "")
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # --- used by the connection ---------------------------------------------------

    @property
    def open(self) -> bool:
        """Connected, and no reason found to stop using the connection."""
        return (self.transport is not None and not self.closed and not self.error
                and not self.transport.is_closing())

    @property
    def usable(self) -> bool:
        """Open, in step with the server, nothing unasked-for received."""
        return self.open and not self.replies and not self.parser.pending

    def write(self, data: bytes) -> None:
        """Send `data` now, after whatever write_soon holds."""
        if self._held:
            self._held.append(data)
            data = b"".join(self._held)
            self._held.clear()
        if self.transport is not None and not self.transport.is_closing():
            self.writes += 1
            self.transport.write(data)

    def write_soon(self, data: bytes) -> None:
        """Send `data` with the next write, or at the end of the loop's turn: what is
        written meanwhile goes out in the same segment."""
        if not self._held:
            self.loop.call_soon(self._flush)
        self._held.append(data)

    def _flush(self) -> None:
        if self._held:
            self.write(b"")

    async def reply(self, timeout: float) -> Reply:
        """The next reply; TimeoutError or _Lost when none comes."""
        if self.replies:
            return self.replies.popleft()
        deadline = self.loop.time() + timeout
        while not self.replies:
            if self.closed or self.error:
                raise _Lost(self.error or "connection lost")
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                raise TimeoutError
            waiter = self._waiter = self.loop.create_future()
            timer = self.loop.call_later(remaining, _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        return self.replies.popleft()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()  # a no-op when already closed
        self.closed = True
        self.error = self.error or "connection closed"


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class Connection:
    """An open SMTP session, past EHLO (and STARTTLS), ready for transactions."""

    def __init__(self, protocol: SmtpProtocol, target: Target, extensions: dict[str, str],
                 command_timeout: float, tls: bool = False,
                 tls_fields: dict[str, Any] | None = None) -> None:
        self.protocol = protocol
        self.target = target
        self.extensions = extensions
        self.command_timeout = command_timeout
        self.tls = tls
        self.tls_fields = tls_fields  # version, cipher, verified, policy: for the events
        self.sent = 0  # transactions run on this connection
        self._needs_reset = False
        self._busy = False
        self._retired = False
        # Reads the last reply of the transaction whose message is written: meanwhile
        # the next transaction's commands may go (pipelined behind it, RFC 2920 3.1).
        self._tail_reader: asyncio.Task[None] | None = None

    @property
    def usable(self) -> bool:
        return not self._busy and not self._retired and self._ready

    @property
    def _ready(self) -> bool:
        """The session can take the next transaction's commands."""
        if self._tail_reader is not None:  # the reply to the last message may be in
            return self.protocol.open
        return self.protocol.usable

    def retire(self) -> None:
        """Take no new transaction (the destination asked to slow down)."""
        self._retired = True

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.extensions

    async def close(self) -> None:
        await self.settle()
        protocol = self.protocol
        if protocol.usable:
            protocol.write(b"QUIT\r\n")
            with contextlib.suppress(TimeoutError, _Lost):
                await protocol.reply(min(QUIT_TIMEOUT, self.command_timeout))
            if protocol.transport is not None:
                protocol.transport.close()  # also after the server closed: marks it closed
                protocol.closed = True
                return
        protocol.abort()

    async def send(self, sender: str, recipients: list[str], data: bytes) -> list[RcptResult]:
        """One transaction, to its last reply; a result for every recipient. Never
        raises for SMTP trouble."""
        future = await self.submit(sender, recipients, data)
        try:
            return await future
        except asyncio.CancelledError:  # the session is out of step
            self.protocol.abort()
            raise

    async def submit(self, sender: str, recipients: list[str], data: bytes
                     ) -> asyncio.Future[list[RcptResult]]:
        """Start one transaction and return once its message is handed to the wire (or
        the transaction ended sooner); the future gives a result for every recipient
        once the last reply is read. With PIPELINING, the reply to the message is read
        while the next transaction's commands go out behind it. Never raises (nor fails
        the future) for SMTP trouble."""
        if self._busy:
            raise RuntimeError("one transaction at a time on a connection")
        host = self.target.host
        future: asyncio.Future[list[RcptResult]] = self.protocol.loop.create_future()
        if not self._ready:
            why = self.protocol.error or "connection is not usable"
            future.set_result([RcptResult(r, 0, why, LOST_STATUS, host, tls=self.tls_fields)
                               for r in recipients])
            return future
        tx = Transaction(sender, recipients, data, extensions=self.extensions, mx=host,
                         reset_first=self._needs_reset)
        self._busy = True
        try:
            await self._run(tx)
        except BaseException:  # cancelled mid-transaction: the session is out of step
            self.protocol.abort()
            raise
        finally:
            self._busy = False
        self.sent += 1
        if tx.done:
            self._finish(tx, future)
        else:
            self._tail_reader = asyncio.get_running_loop().create_task(
                self._read_tail(tx, future))
        return future

    async def settle(self) -> None:
        """Wait until the reply to the last message written is read."""
        if self._tail_reader is not None:
            with contextlib.suppress(Exception):
                await self._tail_reader

    def _finish(self, tx: Transaction, future: asyncio.Future[list[RcptResult]]) -> None:
        if tx.close:
            self.protocol.abort()
        self._needs_reset = tx.needs_reset
        results = tx.results()
        for result in results:
            result.tls = self.tls_fields
        if not future.done():
            future.set_result(results)

    async def _read_tail(self, tx: Transaction,
                         future: asyncio.Future[list[RcptResult]]) -> None:
        try:
            reply = await self._reply(tx)
            if reply is not None:
                tx.receive(reply)
        finally:
            if not tx.done:  # cancelled: the session is out of step
                tx.lost("delivery was stopped while the server's reply was awaited")
            self._tail_reader = None
            self._finish(tx, future)

    async def _run(self, tx: Transaction) -> None:
        protocol = self.protocol
        out = tx.start()
        if self._tail_reader is not None:  # first comes the reply to the last message
            if out:
                protocol.write(out)  # with that message, if it is still held
                out = b""
            await self._tail_reader
        for _ in range(len(tx.recipients) + 6):  # RSET, MAIL, RCPT..., DATA, the dot
            if tx.awaiting_last_reply and self.pipelining:
                protocol.write_soon(out)  # the next transaction's commands may join it
                return
            if out:
                protocol.write(out)
            if tx.done:
                return
            reply = await self._reply(tx)
            if reply is None:
                return
            out = tx.receive(reply)
        tx.lost("the server sent more replies than commands")  # pragma: no cover

    async def _reply(self, tx: Transaction) -> Reply | None:
        """The next reply for `tx`; None when none came (`tx` is then lost)."""
        try:
            return await self.protocol.reply(self.command_timeout)
        except TimeoutError:
            after = " to the message (it may have been delivered)" if tx.data_written else ""
            tx.lost(f"timed out waiting for the remote server's reply{after}")
        except _Lost as exc:
            after = " after the message was sent" if tx.data_written else ""
            tx.lost(f"{exc}{after}")
        return None


# --- opening a connection ----------------------------------------------------------


class _Refused(Exception):
    def __init__(self, code: int, text: str, enhanced: str = "",
                 tls: dict[str, Any] | None = None, policy: bool = False) -> None:
        super().__init__(text)
        self.code = code
        self.text = text
        self.enhanced = enhanced or enhanced_status(code, text)
        self.tls = tls
        self.policy = policy


async def connect(targets: list[Target], settings: ConnectSettings
                  ) -> tuple[Connection | None, list[ConnectFailure]]:
    """A connection to the first target that takes one; the failures on the way."""
    failures: list[ConnectFailure] = []
    for target in targets:
        result = await _open(target, settings)
        if isinstance(result, Connection):
            return result, failures
        failures.append(result)
    return None, failures


async def _open(target: Target, settings: ConnectSettings) -> Connection | ConnectFailure:
    loop = asyncio.get_running_loop()
    protocol = SmtpProtocol(loop)
    where = f"{target.host} [{target.address}]"
    local = (settings.source_address, 0) if settings.source_address else None
    try:
        async with asyncio.timeout(settings.connect_timeout):
            await loop.create_connection(lambda: protocol, target.address, settings.port,
                                         local_addr=local)
    except (OSError, TimeoutError) as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else _describe(exc)
        local_fault = bool(local) and getattr(exc, "errno", None) in LOCAL_ERRNOS
        return ConnectFailure(target, 0, f"cannot connect to {where}: {why}", "4.4.1",
                              local=local_fault)
    try:
        return await _session(protocol, target, settings)
    except _Refused as exc:
        _quit_quietly(protocol)
        return ConnectFailure(target, exc.code, exc.text, exc.enhanced, exc.tls, exc.policy)
    except (TimeoutError, _Lost, OSError) as exc:
        protocol.abort()
        why = "timed out" if isinstance(exc, TimeoutError) else _describe(exc)
        return ConnectFailure(target, 0, f"session with {where} failed: {why}", "4.4.1")
    except BaseException:
        protocol.abort()
        raise


class _Unchecked:
    """Without a destination plan (tests, tools): `tls_required`, no certificate check."""

    context = handshake_context()

    def check(self, policy: HostPolicy, host: str, address: str, peer: PeerInfo,
              sending_ip: str = "") -> Verdict:
        return judge(policy, host, peer, None, _now())


_UNCHECKED = _Unchecked()


def _now() -> Any:
    import datetime

    return datetime.datetime.now(datetime.UTC)


def _tls_setup(settings: ConnectSettings, target: Target) -> tuple[HostPolicy, SessionChecker]:
    if settings.tls is not None:
        policy = settings.tls.plan.host(target.host)
        if policy is not None:
            return policy, settings.tls.checker
    mode = TlsMode.REQUIRED_INSECURE if settings.tls_required else TlsMode.OPPORTUNISTIC_INSECURE
    policy = mode_policy(mode)
    assert policy.check is Check.NONE
    return policy, settings.tls.checker if settings.tls is not None else _UNCHECKED


async def _session(protocol: SmtpProtocol, target: Target, settings: ConnectSettings
                   ) -> Connection:
    """Greeting, EHLO (or HELO), STARTTLS as the host's policy says, the verdict on the
    session; _Refused when the server says no or the policy does."""
    timeout = settings.command_timeout
    policy, checker = _tls_setup(settings, target)
    greeting = await protocol.reply(timeout)
    if greeting.code != 220:
        raise _Refused(greeting.code, greeting.text)
    extensions = await _hello(protocol, settings)
    peer = PeerInfo(offered="STARTTLS" in extensions)
    if peer.offered and policy.starttls:
        protocol.write(b"STARTTLS\r\n")
        reply = await protocol.reply(timeout)
        if reply.code == 421:
            raise _Refused(reply.code, f"STARTTLS refused by {target.host}: {reply}")
        if reply.code == 220:
            peer = await _start_tls(protocol, target, settings, checker.context)
        else:  # TLS was tried: no plain text on this host now
            peer = PeerInfo(True, handshake_error=f"STARTTLS refused by {target.host}: {reply}",
                            starttls_refused=True)
    verdict = checker.check(policy, target.host, target.address, peer, settings.source_address)
    if not verdict.allow:
        raise _Refused(0, verdict.reason, verdict.status, verdict.fields(), policy=True)
    if peer.tls:
        extensions = await _hello(protocol, settings)
    return Connection(protocol, target, extensions, timeout, peer.tls, verdict.fields())


async def _hello(protocol: SmtpProtocol, settings: ConnectSettings) -> dict[str, str]:
    protocol.write(f"EHLO {settings.helo}\r\n".encode())
    reply = await protocol.reply(settings.command_timeout)
    if reply.positive:
        return parse_ehlo(reply)
    if reply.code == 421:
        raise _Refused(reply.code, reply.text)
    protocol.write(f"HELO {settings.helo}\r\n".encode())
    reply = await protocol.reply(settings.command_timeout)
    if not reply.positive:
        raise _Refused(reply.code, reply.text)
    return {}


async def _start_tls(protocol: SmtpProtocol, target: Target, settings: ConnectSettings,
                     context: ssl.SSLContext) -> PeerInfo:
    """The handshake; what the server showed, or why the handshake failed."""
    transport = protocol.transport
    assert transport is not None
    protocol.parser.clear()  # nothing sent before the handshake counts (RFC 3207 4.2)
    protocol.replies.clear()
    try:
        async with asyncio.timeout(settings.connect_timeout + 1):  # the inner one comes first
            new = await protocol.loop.start_tls(
                transport, protocol, context, server_hostname=_sni(target.host),
                ssl_handshake_timeout=settings.connect_timeout)
    except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
        protocol.abort()
        transport.abort()
        await asyncio.sleep(0)  # let the loop finish closing (asyncio's TLS wrapper too)
        why = "timed out" if isinstance(exc, TimeoutError) else _describe(exc)
        return PeerInfo(True, handshake_error=f"TLS handshake with {target.host} "
                        f"[{target.address}] failed: {why}")
    if new is None:  # pragma: no cover - the loop closed the connection
        raise _Lost("connection lost during the TLS handshake")
    protocol.transport = cast(asyncio.Transport, new)
    ssl_object = new.get_extra_info("ssl_object")
    cipher = ssl_object.cipher() if ssl_object is not None else None
    return PeerInfo(True, True, ssl_object.version() or "" if ssl_object is not None else "",
                    cipher[0] if cipher else "", peer_chain(ssl_object))


def peer_chain(ssl_object: Any) -> tuple[bytes, ...]:
    """The certificates the server sent (DER), its own first. Python 3.13 has
    `get_unverified_chain()`; before that the same method is on the private `_sslobj`."""
    if ssl_object is None:
        return ()
    getter = getattr(ssl_object, "get_unverified_chain", None) or getattr(
        getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None)
    chain: list[bytes] = []
    if getter is not None:
        for cert in getter() or ():
            chain.append(cert if isinstance(cert, bytes) else cert.public_bytes(_DER))
    leaf = ssl_object.getpeercert(binary_form=True)
    if leaf and (not chain or chain[0] != leaf):
        chain.insert(0, leaf)
    return tuple(chain)


_DER = getattr(ssl, "_ssl").ENCODING_DER  # noqa: B009 - the private module's constant


def _sni(host: str) -> str | None:
    name = host.rstrip(".")
    if not name:
        return None
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name
    return None


def _quit_quietly(protocol: SmtpProtocol) -> None:
    """Say QUIT without waiting for the reply, and close."""
    if protocol.transport is not None and not protocol.closed:
        protocol.write(b"QUIT\r\n")
        protocol.transport.close()
        protocol.closed = True


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())[:200]
