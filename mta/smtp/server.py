"""The intake listener's connections: a plain asyncio protocol carrying a ServerSession.

The SMTP dialogue itself is `mta.smtp.session` (no I/O); this module writes its
replies (one write per batch of pipelined commands), runs the work it asks for on the
event loop (TLS handshake, pauses, password checks, storing a message), keeps its
inactivity deadline, and applies back-pressure: reading stops while the client does
not read our replies, or while input piles up behind work in progress.

    loop.create_server(lambda: IntakeSMTP(intake, tls_context), host, port)
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, cast

from mta.smtp.session import (
    CheckLogin,
    Client,
    Close,
    Deadline,
    Deliver,
    Event,
    Pause,
    Reply,
    ServerSession,
    StartTls,
)

if TYPE_CHECKING:
    from mta.smtp.intake import Intake

log = logging.getLogger("mta.smtp")

MAX_BUFFERED = 256 * 1024  # pipelined input held while work is out; reading pauses beyond


class IntakeSMTP(asyncio.Protocol):
    """One client connection of the intake listener."""

    def __init__(self, intake: Intake, tls_context: ssl.SSLContext | None = None) -> None:
        self.intake = intake
        self.tls_context = tls_context
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.session: ServerSession | None = None
        self._work: asyncio.Task[None] | asyncio.TimerHandle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._expires = 0.0
        self._reading = True
        self._writable = True
        self._eof = False
        self._tls = False

    # --- asyncio's calls ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        ip = peer[0] if isinstance(peer, tuple) else str(peer or "")
        refusal = self.intake.connection_opened(ip)
        if refusal:
            self.transport.write(refusal.encode() + b"\r\n")
            self.transport.close()
            return
        self.session = ServerSession(self.intake.settings, Client(ip, self.intake.is_trusted(ip)),
                                     self.intake, tls_available=self.tls_context is not None)
        self._carry_out(self.session.start())

    def data_received(self, data: bytes) -> None:
        if self.session is not None:
            self._carry_out(self.session.feed(data))

    def eof_received(self) -> bool:
        self._eof = True
        # A client that half-closes still gets the answer to the work in progress (a TLS
        # transport cannot half-close): the transport is closed once it is written.
        if self._work is not None and not self._tls:
            return True
        self._finish()  # now: the client may reconnect before connection_lost comes
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish()

    def pause_writing(self) -> None:
        self._writable = False
        self._update_reading()

    def resume_writing(self) -> None:
        self._writable = True
        self._update_reading()

    # --- carrying out the session's events ----------------------------------------------------

    def _carry_out(self, events: list[Event]) -> None:
        out: list[str] = []
        for event in events:
            if isinstance(event, Reply):
                out.append(event.text)
            elif isinstance(event, Deadline):
                self._arm(event.seconds)
            else:
                self._write(out)
                out = []
                self._start(event)
        self._write(out)
        if self._eof and self._work is None:
            self._close()
        self._update_reading()

    def _write(self, replies: list[str]) -> None:
        if replies and self.transport is not None:
            self.transport.write(("\r\n".join(replies) + "\r\n").encode())

    def _start(self, event: Event) -> None:
        if isinstance(event, Deliver):
            self._run(self._deliver(event))
        elif isinstance(event, Close):
            self._close()
        elif isinstance(event, CheckLogin):
            self._run(self._check_login(event))
        elif isinstance(event, Pause):
            self._work = self.loop.call_later(event.seconds, self._resume)
        elif isinstance(event, StartTls):
            self._run(self._start_tls(event))

    def _run(self, work: Coroutine[Any, Any, None]) -> None:
        # Not cancelled if the client goes: a message being stored still gets its
        # bookkeeping, a password being checked still counts.
        self._work = self.loop.create_task(work)

    def _answered(self, events: list[Event]) -> None:
        self._work = None
        if self.transport is not None:
            self._carry_out(events)

    def _resume(self) -> None:
        if self.session is not None:
            self._answered(self.session.resume())

    # The work below keeps its own reference to the session: the connection may be gone
    # when the work is over (the session then answers nothing).

    async def _deliver(self, event: Deliver) -> None:
        session = cast(ServerSession, self.session)
        try:
            reply = await self.intake.accept(session.client, event.envelope, event.content)
        except Exception:
            log.exception("SMTP session error from %s", session.client.ip)
            reply = "451 4.3.0 Internal error, try again later"
        self._answered(session.delivered(reply))

    async def _check_login(self, event: CheckLogin) -> None:
        session = cast(ServerSession, self.session)
        try:
            ok = await self.intake.check_login(session.client.ip, event.login, event.password)
        except Exception:
            log.exception("password check failed for %s", session.client.ip)
            ok = False
        self._answered(session.login_checked(ok))

    async def _start_tls(self, event: StartTls) -> None:
        session = cast(ServerSession, self.session)
        assert self.transport is not None and self.tls_context is not None
        try:
            transport = await self.loop.start_tls(self.transport, self, self.tls_context,
                                                  server_side=True,
                                                  ssl_handshake_timeout=event.timeout)
        except Exception as exc:  # whatever the client sent instead of a handshake
            log.info("TLS handshake with %s failed: %r", session.client.ip, exc)
            if self.transport is not None:
                self.transport.abort()
            self._finish()  # a transport handed to TLS may not report its loss
            return
        if self.transport is None:  # lost during the handshake
            transport.abort()
            return
        self.transport = cast(asyncio.Transport, transport)
        self._tls = True
        self._reading = True
        self._answered(session.tls_started())

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()  # after what is written
        self._finish()  # now: the client may reconnect before connection_lost comes

    def _finish(self) -> None:
        """The connection is over: stop the timers, release what it held (once)."""
        self.transport = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if isinstance(self._work, asyncio.TimerHandle):
            self._work.cancel()
            self._work = None
        if self.session is not None:
            self.session.connection_lost()
            self.intake.connection_closed(self.session.client.ip)
            self.session = None

    # --- the inactivity deadline, back-pressure ------------------------------------------------

    def _arm(self, seconds: float) -> None:
        """The client must send within `seconds`; one timer, moved only when it would fire
        too late (most commands just push the deadline further)."""
        self._expires = self.loop.time() + seconds
        if self._timer is None or self._timer_at > self._expires:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = self._expires
            self._timer = self.loop.call_at(self._expires, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self.session is None:
            return
        if self.loop.time() < self._expires:
            self._timer_at = self._expires
            self._timer = self.loop.call_at(self._expires, self._tick)
        elif self._work is None:  # while work is out, the session re-arms when it is answered
            self._carry_out(self.session.timed_out())

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or self.session is None:
            return
        want = self._writable and (self._work is None or self.session.buffered < MAX_BUFFERED)
        if want != self._reading:
            self._reading = want
            if want:
                transport.resume_reading()
            else:
                transport.pause_reading()
