"""The intake's SMTP server session without I/O: bytes in, replies and events out.

`ServerSession.feed(data)` takes whatever the client sent and returns what to do, in
order: `Reply` lines to write, `Deadline` (re-arm the inactivity timer), `Close`, and
the work that needs the event loop, each answered by calling the session back:
`StartTls` (`tls_started`), `Pause` (`resume`), `CheckLogin` (`login_checked`),
`Deliver` (`delivered`). While such work is out, input is only buffered, so pipelined
commands are answered in order. `mta.smtp.server.IntakeSMTP` carries a session over a
plain asyncio protocol; what to accept is asked of the `Policy` (the `Intake`).

Two small tables drive it: `Input` (what the next bytes are: a command, an AUTH answer,
message data, nothing yet) and `COMMANDS` (each verb, the `Phase` it needs and its
handler; `TOO_EARLY` is the reply when the session is not there yet).

What it holds the client to:
- A command line must end in CRLF: a bare LF (the SMTP smuggling vector) gets 521 and
  the session ends. Lines are bounded (500 5.5.2 past `max_command_line`).
- DATA is read in bulk up to the one true end of data, CRLF.CRLF; a message holding a
  bare CR, a bare LF or a NUL anywhere is refused whole (550 5.5.2), so no "end of
  data" variant can smuggle a second message in. Memory stays bounded by the
  transaction's limit (the policy's `data_limit`: `max_message_size`, or less for
  mail from outsiders) whatever the client streams: past it, data is thrown away as it
  comes and the final dot gets 552 5.3.4.
- An untrusted, unauthenticated client is cut off (421) past `max_errors` error
  replies, or past `max_junk_commands` commands that move no mail (NOOP, RSET, HELP,
  VRFY, EXPN, EHLO or HELO once greeted; counted afresh after each message taken).
- Whatever was pipelined after STARTTLS is dropped, and after the handshake the session
  starts over (RFC 3207 4.2).
- Every reply but the greeting's, EHLO's and HELO's carries an enhanced status code.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Protocol

from mta.address import Address, AddressError, parse_path
from mta.wire import crlf_only

log = logging.getLogger("mta.smtp")

END_OF_DATA = b"\r\n.\r\n"
CRLF = b"\r\n"
_TOO_LONG = b""  # what _next_line gives for a line past max_command_line


# --- what the session knows, what it asks, what it answers -------------------------------


@dataclass(frozen=True)
class Settings:
    hostname: str = "localhost"
    max_message_size: int = 26_214_400
    max_command_line: int = 2048
    max_recipients: int = 1000
    max_unknown_commands: int = 5
    max_errors: int = 20  # 4xx/5xx replies to an untrusted, unauthenticated client; 0: off
    max_junk_commands: int = 100  # commands that move no mail, from such a client; 0: off
    idle_timeout: float = 300.0
    data_timeout: float = 600.0
    greet_pause: float = 0.0  # untrusted clients wait this long for the 220


@dataclass(slots=True)
class Client:
    """The other end, as far as the session knows it."""

    ip: str
    trusted: bool = False  # on the trusted networks: may relay, AUTH without TLS
    helo: str = ""
    extended: bool = False  # said EHLO
    tls: bool = False
    login: str | None = None  # the account it authenticated as


@dataclass(slots=True)
class Envelope:
    sender: str | None = None
    recipients: list[str] = field(default_factory=list)


class Policy(Protocol):
    """What the session asks of the intake; a reply string refuses, None goes on."""

    def check_mail(self, client: Client, sender: Address, size: int) -> str | None: ...

    def check_rcpt(self, client: Client, envelope: Envelope, rcpt: Address) -> str | None: ...

    def data_limit(self, client: Client, envelope: Envelope) -> int:
        """The most data this transaction may bring; 0: no limit."""
        ...

    def auth_delay(self, ip: str) -> float | None: ...


@dataclass(frozen=True, slots=True)
class Reply:
    text: str  # one reply, its lines joined by CRLF, without the final CRLF


@dataclass(frozen=True, slots=True)
class Deadline:
    seconds: float  # the client must send its next complete input within this


@dataclass(frozen=True, slots=True)
class Close:
    pass


@dataclass(frozen=True, slots=True)
class StartTls:
    timeout: float  # for the handshake


@dataclass(frozen=True, slots=True)
class Pause:
    seconds: float


@dataclass(frozen=True, slots=True)
class CheckLogin:
    login: str
    password: bytes


@dataclass(frozen=True, slots=True)
class Deliver:
    envelope: Envelope
    content: bytes  # the message as sent, dot-stuffing undone


Event = Reply | Deadline | Close | StartTls | Pause | CheckLogin | Deliver
CLOSE = Close()


# --- the tables ---------------------------------------------------------------------------


class Input(Enum):
    """What the next bytes from the client are."""

    GREETING = "greeting"  # nothing may come before the 220
    COMMAND = "command"
    AUTH = "auth"  # the answer to an AUTH challenge
    DATA = "data"
    WAIT = "wait"  # kept until the outstanding work is answered
    TLS = "tls"  # plain text sent after STARTTLS: dropped
    CLOSED = "closed"


class Phase(IntEnum):
    """How far the dialogue has come; each command needs a phase (COMMANDS)."""

    CONNECTED = 0  # no EHLO or HELO yet
    GREETED = 1
    MAIL = 2  # a sender is accepted
    RCPT = 3  # and at least one recipient


TOO_EARLY = {
    Phase.CONNECTED: "503 5.5.1 Send EHLO or HELO first",
    Phase.GREETED: "503 5.5.1 Need MAIL command first",
    Phase.MAIL: "554 5.5.1 No valid recipients",
}
# AUTH: the challenges each mechanism sends until it has all its answers.
AUTH_CHALLENGES = {"PLAIN": ["334 "], "LOGIN": ["334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6"]}
AUTH_LOCKED = "421 4.7.0 Too many failed authentications, try again later"
# Commands that move no mail; EHLO and HELO too once the client has greeted.
JUNK = frozenset({b"NOOP", b"RSET", b"HELP", b"VRFY", b"EXPN"})
GREETINGS = frozenset({b"EHLO", b"HELO"})


@dataclass(slots=True)
class _AuthExchange:
    mechanism: str
    answers: list[bytes]  # decoded, the initial response first


# --- the session ------------------------------------------------------------------------------


class ServerSession:
    def __init__(self, settings: Settings, client: Client, policy: Policy, *,
                 tls_available: bool = False) -> None:
        self.settings = settings
        self.client = client
        self.policy = policy
        self.tls_available = tls_available
        self.input = Input.GREETING
        self.phase = Phase.CONNECTED
        self.envelope = Envelope()
        self._out: list[Event] = []
        self._buffer = bytearray()
        self._long_line = False  # the line being read is past the limit: skip to its end
        self._data = bytearray()  # the message being received, dot-stuffed, CRLF first
        self._scanned = 0  # where to search for the end of data next
        self._dropped = 0  # bytes of an oversized message thrown away
        self._limit = 0  # the most data of the transaction under way (0: none)
        self._auth: _AuthExchange | None = None
        self._after_pause: Callable[[], None] | None = None
        self._unknown = 0
        self._errors = 0
        self._junk = 0
        self._idle = Deadline(settings.idle_timeout)

    @property
    def buffered(self) -> int:
        """Bytes received and not yet taken (they wait while work is out)."""
        return len(self._buffer)

    # --- the carrier's calls -------------------------------------------------------------

    def start(self) -> list[Event]:
        pause = self.settings.greet_pause
        if pause > 0 and not self.client.trusted:  # as Postfix's postscreen
            self._out.append(Pause(pause))  # the input stays GREETING: talking now is refused
            self._after_pause = self._greet
        else:
            self._greet()
        return self._flush()

    def feed(self, data: bytes) -> list[Event]:
        if self.input is Input.DATA and not self._buffer:
            self._data += data
        elif self.input is not Input.TLS and self.input is not Input.CLOSED:
            self._buffer += data
        return self._run()

    def resume(self) -> list[Event]:
        """The Pause is over."""
        then, self._after_pause = self._after_pause, None
        if then is not None and self.input is not Input.CLOSED:
            then()
        return self._run()

    def login_checked(self, ok: bool | None) -> list[Event]:
        """The answer to a CheckLogin; None: the address may not try any more."""
        if self._auth is None:  # the connection is gone
            return []
        if ok is None:
            self._auth = None
            self._close_with(AUTH_LOCKED)
        elif ok:
            self.client.login = self._auth.answers[-2].decode("utf-8", "replace")
            self._end_auth("235 2.7.0 Authentication successful")
        else:
            self._end_auth("535 5.7.8 Authentication credentials invalid")
        return self._run()

    def delivered(self, reply: str) -> list[Event]:
        """The intake's answer to a Deliver."""
        if self.input is not Input.WAIT:  # the connection is gone
            return []
        if reply.startswith("2"):
            self._junk = 0  # a client that brings mail is no idler
        self._end_data(reply)
        return self._run()

    def tls_started(self) -> list[Event]:
        """The transport is TLS now: forget all that came before (RFC 3207 4.2)."""
        if self.input is not Input.TLS:
            return []
        self.client = Client(self.client.ip, self.client.trusted, tls=True)
        self._reset(Phase.CONNECTED)
        self._buffer.clear()
        self._long_line = False
        self._going_on()
        return self._run()

    def timed_out(self) -> list[Event]:
        if self.input is not Input.CLOSED:
            self._close_with(f"421 4.4.2 {self.settings.hostname} Error: timeout exceeded")
        return self._flush()

    def connection_lost(self) -> None:
        self._auth = None
        self.input = Input.CLOSED

    # --- the input loop ---------------------------------------------------------------------

    def _run(self) -> list[Event]:
        while _TAKE[self.input](self):
            pass
        return self._flush()

    def _flush(self) -> list[Event]:
        out, self._out = self._out, []
        return out

    def _talked_first(self) -> bool:
        if self._buffer:
            log.info("pre-greet traffic from %s", self.client.ip)
            self._close_with("554 5.5.1 Protocol error: talking before the greeting")
        return False

    def _take_command(self) -> bool:
        line = self._next_line()
        if line is None:
            return False
        if self._line_refused(line):
            return True
        verb, _, arg = line[:-2].partition(b" ")
        verb = verb.upper()
        entry = COMMANDS.get(verb)
        if entry is None:
            self._unknown_command()
            return True
        self._out.append(self._idle)
        if self._too_much_junk(verb):
            return True
        needs, handler = entry
        if self.phase < needs:
            self._reply(TOO_EARLY[self.phase])
        else:
            self._call(handler, arg.strip().decode("utf-8", "surrogateescape"))
        if self.input is Input.COMMAND:
            self._limit_errors()
        return True

    def _call(self, handler: Callable[[ServerSession, str], None], arg: str) -> None:
        try:
            handler(self, arg)
        except Exception:  # a bug or a failing policy store: this command fails, not the session
            log.exception("SMTP session error from %s", self.client.ip)
            self._reply("451 4.3.0 Internal error, try again later")

    def _next_line(self) -> bytes | None:
        """One line with its LF; _TOO_LONG past the limit; None until a whole one is in."""
        buffer = self._buffer
        end = buffer.find(b"\n")
        limit = self.settings.max_command_line
        if end < 0:
            if len(buffer) > limit:
                self._long_line = True
                buffer.clear()
            return None
        line = bytes(buffer[: end + 1])
        del buffer[: end + 1]
        if self._long_line or len(line) > limit:
            self._long_line = False
            return _TOO_LONG
        return line

    def _line_refused(self, line: bytes) -> bool:
        if line is _TOO_LONG:
            self._reply("500 5.5.2 Line too long")
        elif not line.endswith(CRLF):
            self._close_with("521 5.5.2 Bare LF received; lines must end in CRLF")
        else:
            return False
        return True

    def _unknown_command(self) -> None:
        self._unknown += 1
        if self._unknown >= self.settings.max_unknown_commands:
            self._close_with("421 4.7.0 Too many unrecognized commands, goodbye")
        else:
            self._reply("500 5.5.1 Command unrecognized")

    def _too_much_junk(self, verb: bytes) -> bool:
        """Count a command that moves no mail; past the limit the session ends. Only for
        untrusted, unauthenticated clients, as `_limit_errors`."""
        limit = self.settings.max_junk_commands
        if (limit <= 0 or self.client.trusted or self.client.login is not None
                or not (verb in JUNK or (verb in GREETINGS and self.client.helo))):
            return False
        self._junk += 1
        if self._junk <= limit:
            return False
        self._close_with(f"421 4.7.0 {self.settings.hostname} Too many commands that send "
                         "no mail, closing")
        return True

    def _limit_errors(self) -> None:
        """Probing clients are cut off; trusted or authenticated senders (whose bulk
        sessions may meet many suppressed recipients) are not."""
        limit = self.settings.max_errors
        if (0 < limit <= self._errors and not self.client.trusted
                and self.client.login is None and self.input is not Input.CLOSED):
            self._close_with("421 4.7.0 Too many errors, goodbye")

    # --- replies and state ----------------------------------------------------------------------

    def _reply(self, text: str) -> None:
        if text[0] in "45":
            self._errors += 1
        self._out.append(Reply(text))

    def _close_with(self, text: str) -> None:
        self._reply(text)
        self._out.append(CLOSE)
        self.input = Input.CLOSED
        self._buffer.clear()

    def _wait(self, work: Event, after_pause: Callable[[], None] | None = None) -> None:
        self._out.append(work)
        self._after_pause = after_pause
        self.input = Input.WAIT

    def _going_on(self) -> None:
        """Back to reading commands, with the full idle time."""
        self.input = Input.COMMAND
        self._out.append(self._idle)

    def _reset(self, phase: Phase) -> None:
        self.envelope = Envelope()
        self.phase = phase

    def _greet(self) -> None:
        self._reply(f"220 {self.settings.hostname} ESMTP ready")
        self._going_on()

    # --- commands ---------------------------------------------------------------------------

    def _helo(self, arg: str) -> None:
        if not arg:
            self._reply("501 5.5.4 Syntax: HELO hostname")
            return
        self._greeted(arg, extended=False)
        self._reply(f"250 {self.settings.hostname}")

    def _ehlo(self, arg: str) -> None:
        if not arg:
            self._reply("501 5.5.4 Syntax: EHLO hostname")
            return
        self._greeted(arg, extended=True)
        lines = [self.settings.hostname, "PIPELINING", f"SIZE {self.settings.max_message_size}",
                 "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"]
        if self.tls_available and not self.client.tls:
            lines.append("STARTTLS")
        if self.client.tls or self.client.trusted:
            lines.append("AUTH PLAIN LOGIN")
        lines.append("HELP")
        self._reply("\r\n".join([f"250-{x}" for x in lines[:-1]] + [f"250 {lines[-1]}"]))

    def _greeted(self, name: str, extended: bool) -> None:
        self.client.helo = name
        self.client.extended = extended
        self._reset(Phase.GREETED)

    def _mail(self, arg: str) -> None:
        if self.phase >= Phase.MAIL:
            self._reply("503 5.5.1 Nested MAIL command")
            return
        if arg[:5].upper() != "FROM:":
            self._reply("501 5.5.4 Syntax: MAIL FROM:<address>")
            return
        try:
            address, params = parse_path(arg[5:], allow_null=True)
            size = self._declared_size(params)
        except AddressError as exc:
            self._reply(exc.reply)
            return
        refusal = self.policy.check_mail(self.client, address, size)
        if refusal:
            self._reply(refusal)
            return
        self.envelope.sender = str(address)
        self.phase = Phase.MAIL
        self._reply("250 2.1.0 Sender OK")

    def _declared_size(self, params: dict[str, str | None]) -> int:
        """The MAIL parameters checked; the SIZE the client declared (0: none)."""
        if params and not self.client.extended:
            raise AddressError("501 5.5.4 Parameters need EHLO")
        size = 0
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not value.isdigit() or len(value) > 20:
                    raise AddressError("501 5.5.4 Bad SIZE parameter")
                size = int(value)
                if size > self.settings.max_message_size > 0:
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

    def _rcpt(self, arg: str) -> None:
        if arg[:3].upper() != "TO:":
            self._reply("501 5.5.4 Syntax: RCPT TO:<address>")
            return
        try:
            address, params = parse_path(self._postmaster(arg[3:]))
        except AddressError as exc:
            self._reply(exc.reply)
            return
        if params:
            self._reply("555 5.5.4 RCPT parameters not supported")
            return
        if len(self.envelope.recipients) >= self.settings.max_recipients:
            self._reply("452 4.5.3 Too many recipients")
            return
        refusal = self.policy.check_rcpt(self.client, self.envelope, address)
        if refusal:
            self._reply(refusal)
            return
        self.envelope.recipients.append(str(address))
        self.phase = Phase.RCPT
        self._reply("250 2.1.5 Recipient OK")

    def _postmaster(self, path: str) -> str:
        stripped = path.strip()
        if stripped[:12].lower() == "<postmaster>":
            return f"<postmaster@{self.settings.hostname}>{stripped[12:]}"
        return path

    def _data_command(self, arg: str) -> None:
        if arg:
            self._reply("501 5.5.4 Syntax: DATA")
            return
        self._reply("354 End data with <CR><LF>.<CR><LF>")
        self._out.append(Deadline(self.settings.data_timeout))
        self.input = Input.DATA
        self._data = bytearray(CRLF)  # the DATA line's CRLF: the first line may be a dot
        self._scanned = 0
        self._dropped = 0
        self._limit = self.policy.data_limit(self.client, self.envelope)

    def _rset(self, arg: str) -> None:
        if arg:
            self._reply("501 5.5.4 Syntax: RSET")
            return
        self._reset(Phase.GREETED if self.client.helo else Phase.CONNECTED)
        self._reply("250 2.0.0 OK")

    def _noop(self, arg: str) -> None:
        self._reply("250 2.0.0 OK")

    def _quit(self, arg: str) -> None:
        if arg:
            self._reply("501 5.5.4 Syntax: QUIT")
        else:
            self._close_with("221 2.0.0 Bye")

    def _vrfy(self, arg: str) -> None:
        if not arg:
            self._reply("501 5.5.4 Syntax: VRFY <address>")
        else:  # RFC 5321 3.5.3: say nothing about mailboxes (no address harvesting)
            self._reply("252 2.5.2 Cannot VRFY user, but will accept message and attempt "
                        "delivery")

    def _expn(self, arg: str) -> None:
        self._reply("502 5.5.1 EXPN not available")

    def _help(self, arg: str) -> None:
        self._reply("214 2.0.0 Supported commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT "
                    "VRFY STARTTLS AUTH HELP")

    def _starttls(self, arg: str) -> None:
        if self.client.tls:
            self._reply("503 5.5.1 TLS already active")
        elif not self.tls_available:
            self._reply("454 4.7.0 TLS not available")
        elif arg:
            self._reply("501 5.5.4 Syntax: STARTTLS")
        else:
            self._reply("220 2.0.0 Ready to start TLS")
            self._out.append(StartTls(self.settings.idle_timeout))
            self._buffer.clear()  # pipelined after STARTTLS: must not run inside TLS
            self.input = Input.TLS

    # --- AUTH (RFC 4954) ---------------------------------------------------------------------------

    def _auth_command(self, arg: str) -> None:
        refusal = self._auth_refusal(arg)
        if refusal:
            self._reply(refusal)
            return
        mechanism, *initial = arg.split()
        delay = self.policy.auth_delay(self.client.ip)
        if delay is None:
            self._close_with(AUTH_LOCKED)
            return
        self._auth = _AuthExchange(mechanism.upper(), [])
        if initial and not self._auth_answer(initial[0].encode()):
            return
        if delay > 0:
            self._wait(Pause(delay), self._auth_next)
        else:
            self._auth_next()

    def _auth_refusal(self, arg: str) -> str | None:
        if not self.client.extended:
            return "503 5.5.1 Send EHLO first"
        if not (self.client.tls or self.client.trusted):
            return "538 5.7.11 Encryption required for requested authentication mechanism"
        if self.client.login is not None:
            return "503 5.5.1 Already authenticated"
        if self.phase >= Phase.MAIL:
            return "503 5.5.1 AUTH not allowed during a mail transaction"
        args = arg.split()
        if not args or len(args) > 2:
            return "501 5.5.4 Syntax: AUTH mechanism [initial-response]"
        if args[0].upper() not in AUTH_CHALLENGES:
            return "504 5.5.4 Unrecognized authentication type"
        return None

    def _auth_next(self) -> None:
        """Send the next challenge, or have the credentials checked once all are in."""
        assert self._auth is not None
        challenges = AUTH_CHALLENGES[self._auth.mechanism]
        answers = self._auth.answers
        if len(answers) < len(challenges):
            self._reply(challenges[len(answers)])
            self._out.append(self._idle)
            self.input = Input.AUTH
            return
        if self._auth.mechanism == "PLAIN":
            parts = answers[0].split(b"\0")
            if len(parts) != 3:
                self._end_auth("501 5.5.2 Cannot split auth value")
                return
            answers[:] = parts[1:]  # authorization identity, then [login, password]
        self._wait(CheckLogin(answers[-2].decode("utf-8", "replace"), answers[-1]))

    def _take_auth_answer(self) -> bool:
        line = self._next_line()
        if line is None:
            return False
        if self._line_refused(line):
            self._end_auth()
        elif line.strip() == b"*":
            self._end_auth("501 5.7.0 Authentication aborted")
        elif self._auth_answer(line.strip()):
            self._auth_next()
        return True

    def _auth_answer(self, blob: bytes) -> bool:
        """Add a base64 answer to the exchange; False (the exchange over) if it is not one."""
        assert self._auth is not None
        try:
            self._auth.answers.append(b"" if blob == b"=" else base64.b64decode(blob, validate=True))
        except binascii.Error:
            self._end_auth("501 5.5.2 Cannot decode base64")
            return False
        return True

    def _end_auth(self, reply: str | None = None) -> None:
        self._auth = None
        if reply is not None:
            self._reply(reply)
        if self.input is not Input.CLOSED:
            self._going_on()
            self._limit_errors()

    # --- message data ----------------------------------------------------------------------------

    def _take_data(self) -> bool:
        body = self._data
        if self._buffer:
            body += self._buffer
            self._buffer.clear()
        end = body.find(END_OF_DATA, self._scanned)
        limit = self._limit or 1 << 62
        if end < 0:
            if len(body) > limit + 8:  # too big: keep only what may hold the end's start
                self._dropped += len(body) - 4
                self._data = body = bytearray(body[-4:])  # and give the memory back
            self._scanned = max(0, len(body) - len(END_OF_DATA) + 1)
            return False
        self._buffer += body[end + len(END_OF_DATA):]
        content = bytes(body[: end + 2])
        self._data = bytearray()
        if self._dropped or end > limit:
            self._end_data(f"552 5.3.4 Message too big (at most {limit} bytes here)")
        elif not is_clean_data(content):
            self._end_data("550 5.5.2 Message refused: bare CR, bare LF or NUL in data")
        else:
            self._wait(Deliver(self.envelope, unstuff(content)))
        return True

    def _end_data(self, reply: str) -> None:
        self._reset(Phase.GREETED)
        self._reply(reply)
        self._going_on()
        self._limit_errors()


COMMANDS: dict[bytes, tuple[Phase, Callable[[ServerSession, str], None]]] = {
    b"EHLO": (Phase.CONNECTED, ServerSession._ehlo),
    b"HELO": (Phase.CONNECTED, ServerSession._helo),
    b"MAIL": (Phase.GREETED, ServerSession._mail),
    b"RCPT": (Phase.MAIL, ServerSession._rcpt),
    b"DATA": (Phase.RCPT, ServerSession._data_command),
    b"RSET": (Phase.CONNECTED, ServerSession._rset),
    b"NOOP": (Phase.CONNECTED, ServerSession._noop),
    b"QUIT": (Phase.CONNECTED, ServerSession._quit),
    b"VRFY": (Phase.CONNECTED, ServerSession._vrfy),
    b"EXPN": (Phase.CONNECTED, ServerSession._expn),
    b"HELP": (Phase.CONNECTED, ServerSession._help),
    b"STARTTLS": (Phase.CONNECTED, ServerSession._starttls),
    b"AUTH": (Phase.GREETED, ServerSession._auth_command),
}
# How each kind of input is taken; True: taken, look again.
_TAKE: dict[Input, Callable[[ServerSession], bool]] = {
    Input.GREETING: ServerSession._talked_first,
    Input.COMMAND: ServerSession._take_command,
    Input.AUTH: ServerSession._take_auth_answer,
    Input.DATA: ServerSession._take_data,
    Input.WAIT: lambda session: False,
    Input.TLS: lambda session: False,
    Input.CLOSED: lambda session: False,
}


def is_clean_data(data: bytes) -> bool:
    """True if every CR and LF in data is part of a CRLF pair and there is no NUL."""
    return b"\0" not in data and crlf_only(data)


def unstuff(data: bytes) -> bytes:
    """Undo dot-stuffing; `data` starts with the CRLF that ended the DATA command."""
    return data.replace(b"\r\n.", b"\r\n")[2:]
