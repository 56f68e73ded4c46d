"""The SMTP protocol of the intake listener: aiosmtpd's SMTP, hardened and made fast.

aiosmtpd keeps the session, TLS upgrade and AUTH machinery; this subclass
replaces the parts that matter for safety and speed:

- Lines come from our own buffer: a command must end in CRLF (a bare LF is the
  SMTP smuggling vector, refused with 521 and a disconnect), lines are bounded,
  and at most one read's worth of pipelined input is held in memory.
- DATA is read in bulk up to the one true end of data, CRLF.CRLF; a message
  holding a bare CR, a bare LF or a NUL anywhere is refused whole (550 5.5.2), so
  no "end of data" variant can smuggle a second message in.
- MAIL and RCPT use our RFC 5321 path parser; every reply carries an enhanced
  status code. What to accept is decided by the `Intake` policy object.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import ssl
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, LoginPassword, TLSSetupException

from mta.smtp.address import AddressError, parse_path

if TYPE_CHECKING:
    from mta.smtp.intake import Intake

log = logging.getLogger("mta.smtp")

END_OF_DATA = b"\r\n.\r\n"
READ_CHUNK = 256 * 1024
_TOO_LONG = b""  # marker returned by _read_line for an over-long line


class _Hooks:
    """aiosmtpd handler hooks, only to put enhanced status codes on its replies."""

    async def handle_RSET(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 2.0.0 OK"

    async def handle_NOOP(self, server: Any, session: Any, envelope: Any, arg: str) -> str:
        return "250 2.0.0 OK"

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        return "221 2.0.0 Bye"


class IntakeSMTP(SMTP):
    def __init__(self, intake: Intake, tls_context: ssl.SSLContext | None = None) -> None:
        cfg = intake.cfg.smtp
        super().__init__(
            _Hooks(), data_size_limit=cfg.max_message_size, enable_SMTPUTF8=True,
            decode_data=False, hostname=intake.cfg.engine.hostname, ident="ESMTP",
            tls_context=tls_context, timeout=cfg.idle_timeout, auth_require_tls=True,
            authenticator=intake.authenticate, loop=asyncio.get_running_loop(),
        )
        self.intake = intake
        self._inbuf = bytearray()
        self._peer_ip = ""
        self._counted = False
        self._errors = 0  # 4xx/5xx replies sent in this session

    # --- connection --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first and self.session is not None:
            peer = self.session.peer
            self._peer_ip = peer[0] if isinstance(peer, tuple) else str(peer)
            self._auth_require_tls = not self.intake.is_trusted(self._peer_ip)

    def connection_lost(self, error: Exception | None) -> None:
        if self._counted:
            self.intake.connection_closed(self._peer_ip)
            self._counted = False
        super().connection_lost(error)

    async def push(self, status: str | bytes) -> None:
        if self.transport is None:
            return
        data = status.encode("utf-8") if isinstance(status, str) else status
        if data[:1] in (b"4", b"5"):
            self._errors += 1
        self._writer.write(data + b"\r\n")
        if self.transport.get_write_buffer_size() > 65536:
            await self._writer.drain()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # --- input -------------------------------------------------------------

    async def _fill(self) -> bool:
        """Read more input into the buffer; False at end of stream."""
        chunk = await self._reader.read(READ_CHUNK)
        if not chunk:
            return False
        self._inbuf += chunk
        return True

    async def _read_line(self) -> bytes | None:
        """One line including its LF; _TOO_LONG past the limit; None at end of stream."""
        limit = self.intake.cfg.smtp.max_command_line
        too_long = False
        while True:
            idx = self._inbuf.find(b"\n")
            if idx >= 0:
                line = bytes(self._inbuf[: idx + 1])
                del self._inbuf[: idx + 1]
                return _TOO_LONG if too_long or len(line) > limit else line
            if len(self._inbuf) > limit:
                too_long = True
                self._inbuf.clear()
            if not await self._fill():
                return None

    # --- the command loop ----------------------------------------------------

    async def _handle_client(self) -> None:
        refusal = self.intake.connection_opened(self._peer_ip)
        if refusal:
            await self.push(refusal)
            self._close()
            return
        self._counted = True
        if not await self._greet_pause():
            return
        await self.push(f"220 {self.hostname} ESMTP ready")
        unknown = 0
        while self.transport is not None:
            try:
                line = await self._read_line()
                if line is None:
                    break
                if line is _TOO_LONG:
                    await self.push("500 5.5.2 Line too long")
                    continue
                if not line.endswith(b"\r\n"):
                    await self.push("521 5.5.2 Bare LF received; lines must end in CRLF")
                    self._close()
                    break
                command, _, arg = line[:-2].partition(b" ")
                method = self._smtp_methods.get(command.upper().decode("ascii", "replace"))
                if method is None:
                    unknown += 1
                    if unknown >= self.intake.cfg.smtp.max_unknown_commands:
                        await self.push("421 4.7.0 Too many unrecognized commands, goodbye")
                        self._close()
                        break
                    await self.push("500 5.5.1 Command unrecognized")
                    continue
                self._reset_timeout()
                text = arg.strip().decode("utf-8", "surrogateescape")
                await method(text or None)
                if self._too_many_errors():
                    await self.push("421 4.7.0 Too many errors, goodbye")
                    self._close()
                    break
            except asyncio.CancelledError:
                self._writer.close()
                raise
            except (ConnectionError, TLSSetupException):
                self._close()
                break
            except Exception:
                log.exception("SMTP session error from %s", self._peer_ip)
                await self.push("451 4.3.0 Internal error, try again later")

    def _too_many_errors(self) -> bool:
        """Probing clients are cut off; trusted or authenticated senders (whose bulk
        sessions may meet many suppressed recipients) are not."""
        limit = self.intake.cfg.smtp.max_errors
        return (0 < limit <= self._errors and not self.intake.is_trusted(self._peer_ip)
                and not (self.session is not None and self.session.authenticated))

    async def _greet_pause(self) -> bool:
        """Hold the 220 back from untrusted clients for `greet_pause` seconds, as Postfix's
        postscreen does; a client that talks (or hangs up) first is cut off. True: go on."""
        pause = self.intake.cfg.smtp.greet_pause
        if pause <= 0 or self.intake.is_trusted(self._peer_ip):
            return True
        try:
            talked = await asyncio.wait_for(self._fill(), pause)
        except TimeoutError:
            return True
        except ConnectionError:
            talked = False
        if talked:
            log.info("pre-greet traffic from %s", self._peer_ip)
            await self.push("554 5.5.1 Protocol error: talking before the greeting")
        self._close()
        return False

    # --- commands ----------------------------------------------------------

    async def smtp_EHLO(self, hostname: str | None) -> None:
        if not hostname:
            await self.push("501 5.5.4 Syntax: EHLO hostname")
            return
        self._set_rset_state()
        assert self.session is not None
        self.session.extended_smtp = True
        self.session.host_name = hostname
        lines = [self.hostname, "PIPELINING", f"SIZE {self.data_size_limit}", "8BITMIME",
                 "SMTPUTF8", "ENHANCEDSTATUSCODES"]
        if self.tls_context and not self._tls_protocol:
            lines.append("STARTTLS")
        if self._tls_protocol or not self._auth_require_tls:
            lines.append("AUTH PLAIN LOGIN")
        lines.append("HELP")
        reply = [f"250-{x}" for x in lines[:-1]] + [f"250 {lines[-1]}"]
        await self.push("\r\n".join(reply))

    async def smtp_VRFY(self, arg: str | None) -> None:
        if not arg:
            await self.push("501 5.5.4 Syntax: VRFY <address>")
            return
        # RFC 5321 3.5.3: say nothing about mailboxes (no address harvesting).
        await self.push("252 2.5.2 Cannot VRFY user, but will accept message and attempt "
                        "delivery")

    async def smtp_EXPN(self, arg: str | None) -> None:
        await self.push("502 5.5.1 EXPN not available")

    async def smtp_HELP(self, arg: str | None) -> None:
        await self.push("214 2.0.0 Supported commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT "
                        "VRFY STARTTLS AUTH HELP")

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if self._tls_protocol:
            await self.push("503 5.5.1 TLS already active")
            return
        if not self.tls_context:
            await self.push("454 4.7.0 TLS not available")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: STARTTLS")
            return
        # Whatever the client pipelined after STARTTLS must not survive the handshake.
        # (Only when a handshake starts: after a refusal the session goes on in step.)
        self._inbuf.clear()
        await super().smtp_STARTTLS(arg)
        self._inbuf.clear()

    async def challenge_auth(self, challenge: str | bytes, encode_to_b64: bool = True,
                             log_client_response: bool = False) -> Any:
        # aiosmtpd reads the answer from its own reader; ours holds the buffered input.
        raw = challenge.encode() if isinstance(challenge, str) else challenge
        await self.push(b"334 " + (base64.b64encode(raw) if encode_to_b64 else raw))
        line = await self._read_line()
        if not line:
            return MISSING
        blob = line.strip()
        if blob == b"*":
            await self.push("501 5.7.0 Authentication aborted")
            return MISSING
        try:
            return base64.b64decode(blob, validate=True)
        except binascii.Error:
            await self.push("501 5.5.2 Cannot decode base64")
            return MISSING

    async def smtp_AUTH(self, arg: str | None) -> None:
        delay = self.intake.auth_delay(self._peer_ip)
        if delay is None:
            await self.push("421 4.7.0 Too many failed authentications, try again later")
            self._close()
            return
        try:
            if delay:
                await asyncio.sleep(delay)
            await super().smtp_AUTH(arg)
        finally:
            self.intake.auth_finished(self._peer_ip)

    # aiosmtpd's auth_PLAIN/auth_LOGIN call the authenticator synchronously, so the scrypt
    # check would block the event loop; these await Intake.check_login (a thread) instead.

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if blob is MISSING:
                return AuthResult(success=False)
        else:
            blob = await self._b64_argument(args[1])
            if blob is None:
                return AuthResult(success=False, handled=True)
        try:
            _authzid, login, password = blob.split(b"\0")
        except ValueError:
            await self.push("501 5.5.2 Cannot split auth value")
            return AuthResult(success=False, handled=True)
        return await self._check_login(login, password)

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await self.challenge_auth(self.AuthLoginUsernameChallenge)
            if login is MISSING:
                return AuthResult(success=False)
        else:
            login = await self._b64_argument(args[1])
            if login is None:
                return AuthResult(success=False, handled=True)
        password = await self.challenge_auth(self.AuthLoginPasswordChallenge)
        if password is MISSING:
            return AuthResult(success=False)
        return await self._check_login(login, password)

    async def _b64_argument(self, text: str) -> bytes | None:
        try:
            return base64.b64decode(text.encode(), validate=True)
        except ValueError:  # binascii.Error, or bytes that were not UTF-8
            await self.push("501 5.5.2 Cannot decode base64")
            return None

    async def _check_login(self, login: bytes, password: bytes) -> AuthResult:
        ok = await self.intake.check_login(self._peer_ip, login.decode("utf-8", "replace"),
                                           password)
        return AuthResult(success=ok, handled=False, auth_data=LoginPassword(login, password))

    async def smtp_MAIL(self, arg: str | None) -> None:
        assert self.session is not None and self.envelope is not None
        if not self.session.host_name:
            await self.push("503 5.5.1 Send EHLO or HELO first")
            return
        if self.envelope.mail_from is not None:
            await self.push("503 5.5.1 Nested MAIL command")
            return
        if not arg or arg[:5].upper() != "FROM:":
            await self.push("501 5.5.4 Syntax: MAIL FROM:<address>")
            return
        try:
            address, params = parse_path(arg[5:], allow_null=True)
            size = self._mail_params(params)
        except AddressError as exc:
            await self.push(exc.reply)
            return
        refusal = self.intake.check_mail(self.session, address, size)
        if refusal:
            await self.push(refusal)
            return
        self.envelope.mail_from = str(address)
        self.envelope.mail_options = [k if v is None else f"{k}={v}" for k, v in params.items()]
        self.envelope.smtp_utf8 = "SMTPUTF8" in params
        await self.push("250 2.1.0 Sender OK")

    def _mail_params(self, params: dict[str, str | None]) -> int:
        assert self.session is not None
        if params and not self.session.extended_smtp:
            raise AddressError("501 5.5.4 Parameters need EHLO")
        size = 0
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not value.isdigit() or len(value) > 20:
                    raise AddressError("501 5.5.4 Bad SIZE parameter")
                size = int(value)
                if self.data_size_limit and size > self.data_size_limit:
                    raise AddressError("552 5.3.4 Message size exceeds fixed maximum size")
            elif key == "BODY":
                if (value or "").upper() not in ("7BIT", "8BITMIME"):
                    raise AddressError("501 5.5.4 BODY must be 7BIT or 8BITMIME")
            elif key == "SMTPUTF8":
                if value is not None:
                    raise AddressError("501 5.5.4 SMTPUTF8 takes no value")
            elif key != "AUTH":
                raise AddressError(f"555 5.5.4 Parameter {key} not supported")
        return size

    async def smtp_RCPT(self, arg: str | None) -> None:
        assert self.session is not None and self.envelope is not None
        if self.envelope.mail_from is None:
            await self.push("503 5.5.1 Need MAIL command first")
            return
        if not arg or arg[:3].upper() != "TO:":
            await self.push("501 5.5.4 Syntax: RCPT TO:<address>")
            return
        try:
            address, params = parse_path(self._postmaster(arg[3:]))
        except AddressError as exc:
            await self.push(exc.reply)
            return
        if params:
            await self.push("555 5.5.4 RCPT parameters not supported")
            return
        if len(self.envelope.rcpt_tos) >= self.intake.cfg.smtp.max_recipients:
            await self.push("452 4.5.3 Too many recipients")
            return
        refusal = self.intake.check_rcpt(self.session, self.envelope, address)
        if refusal:
            await self.push(refusal)
            return
        self.envelope.rcpt_tos.append(str(address))
        await self.push("250 2.1.5 Recipient OK")

    def _postmaster(self, path: str) -> str:
        stripped = path.strip()
        if stripped[:12].lower() == "<postmaster>":
            return f"<postmaster@{self.hostname}>{stripped[12:]}"
        return path

    async def smtp_DATA(self, arg: str | None) -> None:
        assert self.session is not None and self.envelope is not None
        if self.envelope.mail_from is None:
            await self.push("503 5.5.1 Need MAIL command first")
            return
        if not self.envelope.rcpt_tos:
            await self.push("554 5.5.1 No valid recipients")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self._reset_timeout(self.intake.cfg.smtp.data_timeout)
        content, too_big = await self._read_data()
        if content is None:  # the client went away mid-message
            self._close()
            return
        if too_big:
            reply = "552 5.3.4 Message too big"
        elif not is_clean_data(content):
            reply = "550 5.5.2 Message refused: bare CR, bare LF or NUL in data"
        else:
            reply = await self.intake.accept(self.session, self.envelope, unstuff(content))
        self._set_post_data_state()
        self._reset_timeout()
        await self.push(reply)

    async def _read_data(self) -> tuple[bytes | None, bool]:
        """The message up to CRLF.CRLF (still dot-stuffed, ending in CRLF), and too-big."""
        limit = self.data_size_limit or (1 << 62)
        body = bytearray(b"\r\n")  # the CRLF that ended the DATA line opens the search
        body += self._inbuf
        self._inbuf.clear()
        start, discarded = 0, 0
        while True:
            idx = body.find(END_OF_DATA, start)
            if idx >= 0:
                self._inbuf += body[idx + len(END_OF_DATA):]
                if discarded:
                    return b"", True
                return bytes(body[: idx + 2]), idx > limit
            if len(body) > limit + 8:
                discarded += len(body) - 4
                del body[:-4]
            start = max(0, len(body) - len(END_OF_DATA) + 1)
            if not await self._fill_into(body):
                return None, False

    async def _fill_into(self, buffer: bytearray) -> bool:
        chunk = await self._reader.read(READ_CHUNK)
        if not chunk:
            return False
        buffer += chunk
        return True


def is_clean_data(data: bytes) -> bool:
    """True if every CR and LF in data is part of a CRLF pair and there is no NUL."""
    crlf = data.count(b"\r\n")
    return b"\0" not in data and data.count(b"\r") == crlf and data.count(b"\n") == crlf


def unstuff(data: bytes) -> bytes:
    """Undo dot-stuffing; `data` starts with the CRLF that ended the DATA command."""
    return data.replace(b"\r\n.", b"\r\n")[2:]


def make_authenticator(check: Any) -> Any:
    """An aiosmtpd authenticator calling check(client ip, user, password) -> bool."""

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str,
                      auth_data: Any) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        ok = check(peer, auth_data.login.decode("utf-8", "replace"), auth_data.password)
        return AuthResult(success=ok, handled=False, auth_data=auth_data)

    return authenticator
