"""The SMTP client side as plain code: replies parsed from bytes, one transaction as a
state machine. No sockets here (the "sans-I/O" style of h11); mta/delivery/connection.py
carries the bytes.

- `ReplyParser`: bytes in, complete `Reply`s out (multi-line replies, bounded sizes,
  malformed input reported as a `ProtocolError`, never raised past the caller).
- `parse_ehlo`: the extensions an EHLO reply announces.
- `Transaction`: MAIL, RCPT per recipient, DATA, the message, with or without
  PIPELINING (RFC 2920: MAIL, every RCPT and DATA in one write, the replies read in
  order, the message only after 354). It says what to write and turns every reply,
  a lost connection or a timeout into one `RcptResult` per recipient.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mta.queue.outcome import RcptResult, enhanced_status
from mta.wire import crlf_only

MAX_LINE = 8192  # longest reply line accepted (RFC 5321 says 512; servers stretch it)
MAX_REPLY = 65536  # longest multi-line reply accepted, all lines together
LOST_STATUS = "4.4.2"  # no usable reply: the connection was lost, timed out or went astray

_LINE_ENDS = re.compile(rb"\r\n|\r|\n")
_BAD_ADDRESS = re.compile(r"[\x00-\x20\x7f<>]")


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    lines: tuple[str, ...]  # the text of each line, without code and separator

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 300

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class ProtocolError(Exception):
    """The server sent something that is not an SMTP reply, or not the one expected."""


class ReplyParser:
    """Bytes in, complete replies out. After a malformed line, `error` is set and further
    input is ignored: the connection can no longer be trusted."""

    def __init__(self, max_line: int = MAX_LINE, max_reply: int = MAX_REPLY) -> None:
        self.max_line = max_line
        self.max_reply = max_reply
        self.error: ProtocolError | None = None
        self._buffer = bytearray()
        self._code = 0
        self._lines: list[str] = []
        self._size = 0

    @property
    def pending(self) -> bool:
        """True if part of a reply has been received."""
        return bool(self._buffer or self._lines)

    def clear(self) -> None:
        """Forget anything buffered (after STARTTLS: RFC 3207 section 4.2)."""
        self._buffer.clear()
        self._lines = []
        self._code = self._size = 0

    def feed(self, data: bytes) -> list[Reply]:
        replies: list[Reply] = []
        if self.error is not None:
            return replies
        self._buffer += data
        start = 0
        buffer = self._buffer
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            if end - start > self.max_line:
                return self._fail(replies, f"reply line longer than {self.max_line} bytes")
            reply = self._line(bytes(buffer[start:end]).rstrip(b"\r"))
            start = end + 1
            if self.error is not None:
                return self._fail(replies, str(self.error))
            if reply is not None:
                replies.append(reply)
        del buffer[:start]
        if len(buffer) > self.max_line:
            return self._fail(replies, f"reply line longer than {self.max_line} bytes")
        return replies

    def _line(self, line: bytes) -> Reply | None:
        digits, separator = line[:3], line[3:4]
        if not (len(digits) == 3 and digits.isdigit() and b"2" <= digits[:1] <= b"5"
                and separator in (b"", b" ", b"-")):
            self.error = ProtocolError(f"not an SMTP reply: {_shorten(line)!r}")
            return None
        code = int(digits)
        if self._lines and code != self._code:
            self.error = ProtocolError(f"reply code changed within a reply: {self._code}"
                                       f" then {code}")
            return None
        self._size += len(line)
        if self._size > self.max_reply:
            self.error = ProtocolError(f"reply longer than {self.max_reply} bytes")
            return None
        self._code = code
        self._lines.append(line[4:].decode("utf-8", "replace"))
        if separator == b"-":
            return None
        reply = Reply(code, tuple(self._lines))
        self._lines = []
        self._size = 0
        return reply

    def _fail(self, replies: list[Reply], why: str) -> list[Reply]:
        self.error = self.error or ProtocolError(why)
        self.clear()
        return replies


def _shorten(line: bytes, limit: int = 80) -> bytes:
    return line if len(line) <= limit else line[:limit] + b"..."


def parse_ehlo(reply: Reply) -> dict[str, str]:
    """{"PIPELINING": "", "SIZE": "10240000", ...} from a positive EHLO reply."""
    extensions: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            extensions[keyword.upper()] = params.strip()
    return extensions


def prepare_data(data: bytes) -> bytes:
    """The message as it goes on the wire after 354: CRLF line ends, dot-stuffed,
    ending in CRLF "." CRLF. Bare CR or LF is made CRLF (no end-of-data smuggling)."""
    if not crlf_only(data):
        data = _LINE_ENDS.sub(b"\r\n", data)
    if data.startswith(b"."):
        data = b"." + data
    data = data.replace(b"\n.", b"\n..")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


def bad_address(address: str) -> bool:
    """Controls, spaces or angle brackets: never written into a command."""
    return _BAD_ADDRESS.search(address) is not None


# The steps whose replies a transaction waits for.
RSET, MAIL, RCPT, DATA, DOT = "RSET", "MAIL", "RCPT", "DATA", "DOT"


class Transaction:
    """One mail transaction as a state machine.

    `start()` gives the first bytes to write; `receive(reply)` the next bytes to write
    (b"" when there is nothing to write) for each reply, in order; `lost(text)` says the
    connection is gone (or timed out, or went astray). When `done`, `results()` has one
    `RcptResult` per recipient, `close` says the connection must be closed (421, lost,
    protocol error) and `needs_reset` that the server may still hold the transaction
    open (the next one starts with RSET).
    """

    def __init__(self, sender: str, recipients: Sequence[str], data: bytes, *,
                 extensions: Mapping[str, str], mx: str = "", reset_first: bool = False
                 ) -> None:
        self.sender = sender
        self.recipients = list(recipients)
        self.mx = mx
        self.pipelining = "PIPELINING" in extensions
        self.reset_first = reset_first
        self.done = False
        self.close = False
        self.needs_reset = False
        self.data_written = False  # the message and its final dot were handed to the wire
        self._extensions = extensions
        self._data = data
        self._results: list[RcptResult | None] = [None] * len(self.recipients)
        self._to_send: list[int] = []  # recipient indexes that get an RCPT
        self._next_rcpt = 0  # index into _to_send of the next RCPT (without pipelining)
        self._rcpt_replies = 0  # index into _to_send of the next RCPT reply
        self._accepted: list[int] = []
        self._expected: deque[str] = deque()
        self._mail_refused = False
        self._mail_accepted = False
        self._lone_dot = False
        self._started = False
        self._params, self._utf8 = self._mail_parameters()

    @property
    def awaiting_last_reply(self) -> bool:
        """The message (or a lone dot) is written: only the reply to it is still to come,
        and the session is ready for the next transaction's commands (RFC 2920 3.1: the
        message content may begin a group of pipelined commands)."""
        return not self.done and len(self._expected) == 1 and self._expected[0] == DOT

    # --- what to write ---------------------------------------------------------

    def start(self) -> bytes:
        if self._started:
            raise RuntimeError("transaction already started")
        self._started = True
        if not self._check_addresses():
            self.needs_reset = self.reset_first  # nothing was sent: still to do next time
            self.done = True
            return b""
        if self.pipelining:
            rcpts = len(self._to_send)
            self._expected.extend([RSET] * self.reset_first + [MAIL] + [RCPT] * rcpts + [DATA])
            self._next_rcpt = rcpts
            return b"".join([self._command(RSET)] * self.reset_first + [self._command(MAIL)]
                            + [self._rcpt_command(i) for i in range(rcpts)]
                            + [self._command(DATA)])
        return self._send(RSET if self.reset_first else MAIL)

    def _send(self, step: str) -> bytes:
        self._expected.append(step)
        if step == RCPT:
            self._next_rcpt += 1
            return self._rcpt_command(self._next_rcpt - 1)
        return self._command(step)

    def _command(self, step: str) -> bytes:
        if step == MAIL:
            return self._encode(f"MAIL FROM:<{self.sender}>{self._params}\r\n")
        return f"{step}\r\n".encode()

    def _rcpt_command(self, position: int) -> bytes:
        return self._encode(f"RCPT TO:<{self.recipients[self._to_send[position]]}>\r\n")

    def _encode(self, text: str) -> bytes:
        return text.encode("utf-8" if self._utf8 else "ascii")

    def _mail_parameters(self) -> tuple[str, bool]:
        ext = self._extensions
        params = ""
        if "SIZE" in ext:
            params += f" SIZE={len(self._data)}"
        if "8BITMIME" in ext and not self._data.isascii():
            params += " BODY=8BITMIME"
        utf8 = not (self.sender.isascii() and all(r.isascii() for r in self.recipients))
        if utf8 and "SMTPUTF8" in ext:
            params += " SMTPUTF8"
        return params, utf8 and "SMTPUTF8" in ext

    def _check_addresses(self) -> bool:
        """Refuse here what must never be written; False if nothing is left to send."""
        utf8_ok = "SMTPUTF8" in self._extensions
        if bad_address(self.sender):
            self._fail_all(501, "5.1.7 the sender address cannot be written in a command")
            return False
        if not self.sender.isascii() and not utf8_ok:
            self._fail_all(553, "5.6.7 the server does not support SMTPUTF8 (non-ASCII sender)")
            return False
        for index, rcpt in enumerate(self.recipients):
            if bad_address(rcpt) or not rcpt:
                self._set(index, 501, "5.1.3 the recipient address cannot be written in a command")
            elif not rcpt.isascii() and not utf8_ok:
                self._set(index, 553, "5.6.7 the server does not support SMTPUTF8"
                                      " (non-ASCII recipient)")
            else:
                self._to_send.append(index)
        return bool(self._to_send)

    # --- what comes back -------------------------------------------------------

    def receive(self, reply: Reply) -> bytes:
        """The next reply, in order; the bytes to write next (b"" for none)."""
        if self.done:
            raise ProtocolError(f"reply after the transaction ended: {reply}")
        if not self._expected:
            self.lost(f"unexpected reply from the server: {_short(reply)}")
            return b""
        step = self._expected.popleft()
        if reply.code == 421:  # the server is closing the connection
            self._closing(reply)
            return b""
        handler = {RSET: self._on_rset, MAIL: self._on_mail, RCPT: self._on_rcpt,
                   DATA: self._on_data, DOT: self._on_dot}[step]
        return handler(reply)

    def _on_rset(self, reply: Reply) -> bytes:
        return b"" if self.pipelining else self._send(MAIL)

    def _on_mail(self, reply: Reply) -> bytes:
        if not reply.positive:
            self._mail_refused = True
            for index in self._to_send:
                self._set_reply(index, reply)
            if not self.pipelining:
                self.done = True
            return b""  # pipelined: the RCPT and DATA replies still come
        self._mail_accepted = True
        return b"" if self.pipelining else self._send(RCPT)

    def _on_rcpt(self, reply: Reply) -> bytes:
        index = self._to_send[self._rcpt_replies]
        self._rcpt_replies += 1
        if not self._mail_refused:
            if reply.positive:
                self._accepted.append(index)
            else:
                self._set_reply(index, reply)
        if self.pipelining:
            return b""
        if self._next_rcpt < len(self._to_send):
            return self._send(RCPT)
        if self._accepted:
            return self._send(DATA)
        self.needs_reset = True
        self.done = True
        return b""

    def _on_data(self, reply: Reply) -> bytes:
        if reply.code == 354:
            self._expected.append(DOT)
            if self._accepted:
                self.data_written = True
                return prepare_data(self._data)
            self._lone_dot = True  # RFC 2920 3.1: no recipient, yet 354: end at once
            return b".\r\n"
        if reply.code < 400:
            self._protocol_error(f"unexpected reply to DATA: {_short(reply)}")
            return b""
        for index in self._accepted:
            self._set_reply(index, reply)
        self.needs_reset = self._mail_accepted
        self.done = True
        return b""

    def _on_dot(self, reply: Reply) -> bytes:
        if not self._lone_dot:
            if reply.code < 200 or 300 <= reply.code < 400:
                self._protocol_error(f"unexpected reply to the message: {_short(reply)}")
                return b""
            for index in self._accepted:
                self._set_reply(index, reply)
        self.done = True
        return b""

    def lost(self, text: str) -> None:
        """No (usable) reply will come: every open recipient gets a 4.4.2 result.
        Accepted recipients may get the message twice if it was written."""
        accepted = set(self._accepted) if self.data_written else set()
        for index, result in enumerate(self._results):
            if result is None:
                self._results[index] = RcptResult(
                    self.recipients[index], 0, text, LOST_STATUS, self.mx,
                    possible_duplicate=index in accepted)
        self._expected.clear()
        self.close = True
        self.done = True

    def _protocol_error(self, text: str) -> None:
        self.lost(text)

    def _closing(self, reply: Reply) -> None:
        for index, result in enumerate(self._results):
            if result is None:
                self._set_reply(index, reply)
        self._expected.clear()
        self.close = True
        self.done = True

    # --- results ---------------------------------------------------------------------

    def results(self) -> list[RcptResult]:
        if not self.done:
            raise RuntimeError("the transaction is not finished")
        if any(r is None for r in self._results):  # pragma: no cover - a bug if reached
            self.lost("no reply for this recipient")
        return [r for r in self._results if r is not None]

    def _set_reply(self, index: int, reply: Reply) -> None:
        self._set(index, reply.code, reply.text)

    def _set(self, index: int, code: int, text: str) -> None:
        self._results[index] = RcptResult(self.recipients[index], code, text,
                                          enhanced_status(code, text), self.mx)

    def _fail_all(self, code: int, text: str) -> None:
        for index in range(len(self.recipients)):
            self._set(index, code, text)


def _short(reply: Reply, limit: int = 200) -> str:
    text = " ".join(str(reply).split())
    return text if len(text) <= limit else text[:limit] + "..."
