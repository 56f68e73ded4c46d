"""Sink MX servers on 127.0.0.x for tests and benchmarks.

Two kinds, both counting sessions and messages:

- `SmtpSink`: Postfix's `smtp-sink` (C, fast: the bench's remote MX) with its fault
  options: reject commands with 4xx/5xx (`soft_reject`/`hard_reject`), drop the
  connection (`disconnect`) or say 421 (`close_421`) at a command, delay replies
  (`delays={".": 2}`), and optionally capture every message (`capture=True`).
  Its faults apply to every recipient alike and delays are whole seconds.
- `AsyncioSink`: our own asyncio SMTP sink with per-recipient faults (regex -> reply),
  421 (or any reply) on connect, drop after the final dot, a delayed reply to the
  dot, optional STARTTLS, and the received messages recorded (envelope, bytes,
  arrival time, session number). It runs in-process on its own thread
  (`start()`), inside a running loop (`await start_async()`), or as a separate
  process (`AsyncioSinkProcess`, so the bench's CPU accounting stays clean).

The SMTP server side of `AsyncioSink` is a sans-I/O state machine (`SinkSession`:
bytes in, events out); the asyncio protocol only carries out its events.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import re
import select
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from bench.net import free_port, hostport, port_is_free
from bench.rig.loop_thread import START_TIMEOUT, LoopThread, new_event_loop

SMTP_SINK = "/usr/sbin/smtp-sink"
SMTP_SINK_COMMANDS = frozenset(
    {"connect", "helo", "ehlo", "lhlo", "xclient", "xforward", "auth", "mail", "rcpt",
     "data", ".", "rset", "noop", "vrfy", "quit"}
)
CAPTURE_SEPARATOR = "\001\002RIG-SINK-MESSAGE\002\001\n"
# smtp-sink makes (and unlinks) a temporary file per captured message next to its capture
# file. On a disk file system (ext4) the inode search past thousands of recently deleted
# inodes cost the sinks about as much CPU as the MTA under test (perf: find_get_block,
# recently_deleted); in memory (tmpfs) it costs next to nothing. The sinks stand for
# remote servers: the less of the shared CPU they take, the more the bench measures the MTA.
MEMORY_DIR = Path("/dev/shm")
MEMORY_DIR_MIN_FREE = 2**30  # capture files are rotated at 64 MiB; four sinks fit well
_COUNTERS = re.compile(rb"sess=(\d+) quit=(\d+) (?:msg|mesg)=(\d+)")
POLL = 0.01
# smtp-sink -c writes its counters at every command: read each change at once and this
# thread woke (and took the bench's GIL) thousands of times a second; now a few hundred.
COUNTER_READ_PAUSE = 0.005


# --- shared helpers ---------------------------------------------------------


def memory_dir() -> Path | None:
    """A directory in memory with room for the sinks' capture files, else None (the
    system's temporary directory)."""
    try:
        stats = os.statvfs(MEMORY_DIR)
    except OSError:
        return None
    room = stats.f_bavail * stats.f_frsize
    return MEMORY_DIR if room >= MEMORY_DIR_MIN_FREE and os.access(MEMORY_DIR, os.W_OK) else None


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll `predicate` until it holds or `timeout` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return predicate()
        time.sleep(POLL)
    return True


# --- Postfix smtp-sink --------------------------------------------------------


@dataclass(frozen=True)
class SmtpSinkOptions:
    """smtp-sink's behaviour. Commands are names like "RCPT", ".", "connect" (any case)."""

    hard_reject: Sequence[str] = ()  # -f: 5xx to these commands
    soft_reject: Sequence[str] = ()  # -r: 4xx to these commands
    disconnect: Sequence[str] = ()  # -q: drop the connection, no reply
    close_421: Sequence[str] = ()  # -Q: 421 and disconnect
    delays: Mapping[str, int] = field(default_factory=dict)  # -W: whole seconds per command
    hard_reply: str = ""  # -B, default "500 5.3.0 Error: command failed"
    soft_reply: str = ""  # -b, default "450 4.3.0 Error: command failed"
    abort_after_data: int | None = None  # -A: 550 and disconnect this long after DATA
    pipelining: bool = True  # -p when false (-f and -r turn it off too)
    esmtp: bool = True  # -e when false
    enhanced_status: bool = True  # -E when false
    hostname: str = "smtp-sink.test"  # -h
    max_connections: int = 256  # -m
    timeout: int = 100  # -t
    backlog: int = 256
    capture: bool = False  # keep every message (see SmtpSink.captured())


def _commands(option: str, commands: Sequence[str]) -> list[str]:
    names = [c.lower() for c in commands]
    unknown = sorted(set(names) - SMTP_SINK_COMMANDS)
    if unknown:
        raise ValueError(f"smtp-sink knows no command {unknown[0]!r}")
    return [option, ",".join(names)] if names else []


def _reply(option: str, reply: str, first_digit: str) -> list[str]:
    if not reply:
        return []
    if not (reply[:1] == first_digit and reply[:3].isdigit()):
        raise ValueError(f"{option} needs a {first_digit}xx reply, got {reply!r}")
    return [option, reply]


def smtp_sink_command(
    host: str,
    port: int,
    options: SmtpSinkOptions,
    *,
    binary: str = SMTP_SINK,
    capture_file: str | None = None,
    user: str | None = None,
) -> list[str]:
    """The smtp-sink argv for these options (always with -c, the running counters)."""
    argv = [binary, "-c", "-h", options.hostname, "-m", str(options.max_connections),
            "-t", str(options.timeout)]
    argv += _commands("-f", options.hard_reject) + _commands("-r", options.soft_reject)
    argv += _commands("-q", options.disconnect) + _commands("-Q", options.close_421)
    for command, seconds in options.delays.items():
        _commands("-W", [command])
        if int(seconds) < 1:
            raise ValueError(f"smtp-sink delays are whole seconds >= 1, got {seconds!r}")
        argv += ["-W", f"{command.lower()}:{int(seconds)}"]
    argv += _reply("-B", options.hard_reply, "5") + _reply("-b", options.soft_reply, "4")
    if options.abort_after_data is not None:
        argv += ["-A", str(options.abort_after_data)]
    argv += [flag for flag, on in (("-p", options.pipelining), ("-e", options.esmtp),
                                   ("-E", options.enhanced_status)) if not on]
    if capture_file is not None:
        octal = "".join(f"\\{ord(c):03o}" if ord(c) < 32 else c for c in CAPTURE_SEPARATOR)
        argv += ["-D", capture_file.replace("%", "%%"), "-S", octal]
    if user is not None:
        argv += ["-u", user]
    return argv + [f"inet:{hostport(host, port)}", str(options.backlog)]


def parse_counters(output: bytes) -> tuple[int, int, int] | None:
    """The last (sessions, quits, messages) in smtp-sink -c output, if any."""
    matches = _COUNTERS.findall(output)
    if not matches:
        return None
    sess, quit_, msg = matches[-1]
    return int(sess), int(quit_), int(msg)


@dataclass(frozen=True)
class CapturedMessage:
    """One message as smtp-sink captured it."""

    client_address: str
    helo: str
    mail_from: str  # the MAIL FROM argument, e.g. "<a@example.com> SIZE=12"
    rcpt_tos: tuple[str, ...]  # RCPT TO arguments, e.g. "<b@example.net>"
    data: bytes  # the message as sent (CRLF line ends, dot-unstuffed)


def parse_capture(raw: bytes) -> list[CapturedMessage]:
    """Split an smtp-sink -D/-S capture file into messages."""
    separator = CAPTURE_SEPARATOR.encode()
    return [_parse_one(chunk) for chunk in raw.split(separator) if chunk]


def capture_head(chunk: bytes) -> tuple[bytes, int]:
    """(the header block of one captured message, CRLF line ends and ending in the empty
    line; its number of RCPT TO), read without copying its body: the bench reads every
    message it delivers while the MTA it measures runs on the same machine."""
    split = _split_capture(chunk)
    if split is None:
        return b"", 0
    x_lines, start = split
    rcpts = x_lines.count(b"\nX-Rcpt-Args: ") + x_lines.startswith(b"X-Rcpt-Args: ")
    end = start if chunk.startswith(b"\n", start) else chunk.find(b"\n\n", start)
    head = chunk[start: end if end >= 0 else len(chunk)].removesuffix(b"\n")
    return head.replace(b"\n", b"\r\n") + b"\r\n\r\n", rcpts


def _split_capture(chunk: bytes) -> tuple[bytes, int] | None:
    """(smtp-sink's X- lines, where the message data starts: after the three lines of
    its Received:) of one captured message; None without a Received: line."""
    received = 0 if chunk.startswith(b"Received: ") else chunk.find(b"\nReceived: ")
    if received < 0:
        return None
    received += received > 0  # past the line end before it
    start = received
    for _ in range(3):  # Received: is three lines
        end = chunk.find(b"\n", start)
        start = len(chunk) if end < 0 else end + 1
    return chunk[:received], start


def _parse_one(chunk: bytes) -> CapturedMessage:
    split = _split_capture(chunk)
    x_lines, start = split if split is not None else (chunk, len(chunk))
    fields: dict[str, list[str]] = {}
    for line in x_lines.removesuffix(b"\n").split(b"\n"):
        name, _, value = line.decode("utf-8", "replace").partition(": ")
        fields.setdefault(name, []).append(value)
    body = chunk[start:].removesuffix(b"\n")  # the final dot's line end
    return CapturedMessage(
        client_address=fields.get("X-Client-Addr", [""])[0],
        helo=fields.get("X-Helo-Args", [""])[0],
        mail_from=fields.get("X-Mail-Args", [""])[0],
        rcpt_tos=tuple(fields.get("X-Rcpt-Args", [])),
        data=body.replace(b"\n", b"\r\n"),
    )


class SmtpSink:
    """A Postfix smtp-sink process on host:port with running counters.

    `sessions` counts connections that have *ended* (smtp-sink counts at disconnect),
    `messages` every final dot received (whatever the reply), `quits` QUIT commands.
    Running as root, smtp-sink drops privileges to `user` (default "nobody").
    """

    def __init__(
        self,
        host: str = "127.0.0.2",
        port: int = 0,
        *,
        binary: str = SMTP_SINK,
        user: str = "nobody",
        **options: Any,
    ) -> None:
        self.host = host
        self.port = port
        self._requested_port = port
        self.binary = binary
        self.user = user if os.geteuid() == 0 else None
        self.options = SmtpSinkOptions(**options)
        self._counters = (0, 0, 0)
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._workdir: Path | None = None

    @property
    def address(self) -> str:
        return hostport(self.host, self.port)

    @property
    def sessions(self) -> int:
        return self._counters[0]

    @property
    def quits(self) -> int:
        return self._counters[1]

    @property
    def messages(self) -> int:
        return self._counters[2]

    @property
    def capture_file(self) -> Path | None:
        return None if self._workdir is None else self._workdir / "capture" / "messages"

    def start(self) -> SmtpSink:
        if self._proc is not None:
            return self
        if not Path(self.binary).exists():
            raise FileNotFoundError(f"{self.binary} not found (Debian package postfix)")
        self._workdir = Path(tempfile.mkdtemp(prefix="smtp-sink-", dir=memory_dir()))
        self._workdir.chmod(0o755)
        (self._workdir / "capture").mkdir(mode=0o777)
        (self._workdir / "capture").chmod(0o777)  # smtp-sink writes as `user`
        for _ in range(5):
            if self._launch():
                return self
        self.stop()
        raise RuntimeError(f"smtp-sink did not start on {self.address}: {self._stderr()}")

    def _launch(self) -> bool:
        """Start the process on a (new) port; False if it could not listen there."""
        self.port = self._requested_port or free_port(self.host)
        capture = str(self.capture_file) if self.options.capture else None
        argv = smtp_sink_command(self.host, self.port, self.options, binary=self.binary,
                                 capture_file=capture, user=self.user)
        assert self._workdir is not None
        with open(self._workdir / "stderr", "wb") as stderr:
            self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr,
                                          stdin=subprocess.DEVNULL)
        self._counters = (0, 0, 0)
        self._reader = threading.Thread(target=self._read_counters, args=(self._proc,),
                                        name=f"smtp-sink-{self.port}", daemon=True)
        self._reader.start()
        proc = self._proc
        listening = wait_until(
            lambda: proc.poll() is not None or not port_is_free(self.host, self.port),
            START_TIMEOUT,
        )
        if listening and proc.poll() is None:
            return True
        self._terminate()
        return False

    def _read_counters(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        tail = b""
        while chunk := os.read(proc.stdout.fileno(), 65536):
            tail = (tail + chunk)[-256:]
            counters = parse_counters(tail[: tail.rfind(b"\r") + 1])
            if counters is not None:
                self._counters = counters
            time.sleep(COUNTER_READ_PAUSE)  # the latest counters are out; let more gather

    def _stderr(self) -> str:
        if self._workdir is None or not (self._workdir / "stderr").exists():
            return ""
        return (self._workdir / "stderr").read_text(errors="replace").strip()

    def captured(self) -> list[CapturedMessage]:
        """Every message received so far (needs capture=True)."""
        if not self.options.capture:
            raise RuntimeError("start the sink with capture=True to keep messages")
        path = self.capture_file
        return parse_capture(path.read_bytes()) if path and path.exists() else []

    def wait_for(self, *, messages: int = 0, sessions: int = 0, timeout: float = 10.0) -> bool:
        """Wait until at least `messages` messages and `sessions` ended sessions are counted."""
        return wait_until(lambda: self.messages >= messages and self.sessions >= sessions,
                          timeout)

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._reader is not None:
            self._reader.join(timeout=5)
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()

    def stop(self) -> None:
        self._terminate()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_smtp_sinks(hosts: Sequence[str], port: int = 0, **options: Any) -> list[SmtpSink]:
    """One smtp-sink per host, all on the same port (free on all of them when 0)."""
    port = port or free_port(*hosts)
    sinks: list[SmtpSink] = []
    try:
        for host in hosts:
            sinks.append(SmtpSink(host, port, **options).start())
    except BaseException:
        for sink in sinks:
            sink.stop()
        raise
    return sinks


# --- our asyncio sink: the sans-I/O session -----------------------------------


@dataclass
class SinkFaults:
    """What an AsyncioSink does wrong on purpose. Change it at run time; sessions see it.

    Replies are full lines without CRLF, e.g. "451 4.3.0 try later". A 421 reply
    always closes the connection, like a real server.
    """

    greeting: str = ""  # instead of 220: e.g. "421 4.3.2 busy" (4xx/5xx greetings close)
    mail_reply: str = ""  # reply to every MAIL FROM
    rcpt_rules: list[tuple[str, str]] = field(default_factory=list)  # (regex, reply)
    data_reply: str = ""  # reply to DATA instead of 354
    dot_reply: str = ""  # reply to the final dot instead of 250
    dot_delay: float = 0.0  # seconds before replying to the final dot
    drop_after_dot: bool = False  # close without replying once the message is in

    def rcpt_reply(self, address: str) -> str:
        """The reply of the first rule whose regex is found in `address` (any case), or ''."""
        return next(
            (reply for pattern, reply in self.rcpt_rules if re.search(pattern, address, re.I)),
            "",
        )


@dataclass(frozen=True)
class Reply:
    text: str  # one or more lines, CRLF-separated, without the final CRLF
    delay: float = 0.0


@dataclass(frozen=True)
class Close:
    pass


@dataclass(frozen=True)
class StartTls:
    pass


@dataclass(frozen=True)
class MessageIn:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    accepted: bool  # False when the dot is answered with an error


SinkEvent = Reply | Close | StartTls | MessageIn
_ADDRESS = re.compile(r"^\s*(?:FROM|TO)\s*:\s*<?([^<>\s]*)>?", re.I)
MAX_LINE = 4096
DATA_END = b"\r\n.\r\n"


def envelope_address(argument: str) -> str | None:
    """'FROM:<a@b> SIZE=10' -> 'a@b' ('' for <>); None when unparseable."""
    match = _ADDRESS.match(argument)
    return None if match is None else match.group(1)


class SinkSession:
    """One SMTP server session as a state machine: `feed(bytes)` -> events to carry out."""

    def __init__(
        self,
        faults: SinkFaults,
        hostname: str = "sink.test",
        *,
        tls_available: bool = False,
        max_message_size: int = 64 * 1024 * 1024,
        record: bool = True,
    ) -> None:
        self.faults = faults
        self.hostname = hostname
        self.tls_available = tls_available
        self.tls_active = False
        self.max_message_size = max_message_size
        self.record = record
        self.closed = False
        self._buffer = bytearray()
        self._data: bytearray | None = None  # message data while in DATA
        self._scanned = 0
        self._oversize = False
        self._mail_from: str | None = None
        self._rcpts: list[str] = []
        self._queued = 0
        self.helo = ""  # the client's EHLO (or HELO) name

    def start(self) -> list[SinkEvent]:
        greeting = self.faults.greeting or f"220 {self.hostname} ESMTP sink"
        if greeting[:1] in "45":
            return self._closing(greeting)
        return [Reply(greeting)]

    def feed(self, data: bytes) -> list[SinkEvent]:
        events: list[SinkEvent] = []
        if self.closed:
            return events
        self._buffer += data
        while not self.closed:
            if self._data is not None:
                if not self._take_data(events):
                    break
            else:
                line = self._take_line(events)
                if line is None:
                    break
                self._command(line, events)
                if events and isinstance(events[-1], StartTls):
                    self._buffer.clear()  # nothing sent before the handshake counts
                    break
        return events

    def tls_started(self) -> None:
        """The transport is now TLS: forget everything (RFC 3207 4.2)."""
        self.tls_active = True
        self._reset()

    # --- commands ------------------------------------------------------------

    def _take_line(self, events: list[SinkEvent]) -> str | None:
        end = self._buffer.find(b"\n")
        if end < 0:
            if len(self._buffer) > MAX_LINE:
                self._buffer.clear()
                events.append(Reply("500 5.5.2 Error: line too long"))
            return None
        line = bytes(self._buffer[:end]).rstrip(b"\r")
        del self._buffer[: end + 1]
        return line.decode("utf-8", "replace")

    def _command(self, line: str, events: list[SinkEvent]) -> None:
        verb, _, argument = line.partition(" ")
        handler = {
            "EHLO": self._ehlo, "HELO": self._helo, "MAIL": self._mail, "RCPT": self._rcpt,
            "DATA": self._data_command, "RSET": self._rset, "NOOP": self._noop,
            "QUIT": self._quit, "STARTTLS": self._starttls,
        }.get(verb.upper())
        if handler is None:
            events.append(Reply("502 5.5.2 Error: command not recognized"))
        else:
            events.extend(handler(argument))

    def _ehlo(self, argument: str) -> list[SinkEvent]:
        self._reset()
        self.helo = argument.strip()
        lines = [self.hostname, "PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES",
                 f"SIZE {self.max_message_size}"]
        if self.tls_available and not self.tls_active:
            lines.append("STARTTLS")
        text = "\r\n".join(f"250-{x}" for x in lines[:-1]) + f"\r\n250 {lines[-1]}"
        return [Reply(text)]

    def _helo(self, argument: str) -> list[SinkEvent]:
        self._reset()
        self.helo = argument.strip()
        return [Reply(f"250 {self.hostname}")]

    def _mail(self, argument: str) -> list[SinkEvent]:
        if self._mail_from is not None:
            return [Reply("503 5.5.1 Error: nested MAIL command")]
        address = envelope_address(argument)
        if address is None:
            return [Reply("501 5.5.4 Syntax: MAIL FROM:<address>")]
        if self.faults.mail_reply:
            return self._maybe_closing(self.faults.mail_reply)
        self._mail_from = address
        return [Reply("250 2.1.0 Ok")]

    def _rcpt(self, argument: str) -> list[SinkEvent]:
        if self._mail_from is None:
            return [Reply("503 5.5.1 Error: need MAIL command")]
        address = envelope_address(argument)
        if address is None:
            return [Reply("501 5.5.4 Syntax: RCPT TO:<address>")]
        failure = self.faults.rcpt_reply(address)
        if failure:
            return self._maybe_closing(failure)
        self._rcpts.append(address)
        return [Reply("250 2.1.5 Ok")]

    def _data_command(self, _: str) -> list[SinkEvent]:
        if self._mail_from is None or not self._rcpts:
            return [Reply("503 5.5.1 Error: need RCPT command")]
        if self.faults.data_reply:
            return self._maybe_closing(self.faults.data_reply)
        self._data = bytearray(b"\r\n")  # a virtual line end: the data may start with "."
        self._scanned = 0
        self._oversize = False
        return [Reply("354 End data with <CR><LF>.<CR><LF>")]

    def _rset(self, _: str) -> list[SinkEvent]:
        self._reset()
        return [Reply("250 2.0.0 Ok")]

    def _noop(self, _: str) -> list[SinkEvent]:
        return [Reply("250 2.0.0 Ok")]

    def _quit(self, _: str) -> list[SinkEvent]:
        return self._closing("221 2.0.0 Bye")

    def _starttls(self, _: str) -> list[SinkEvent]:
        if not self.tls_available or self.tls_active:
            return [Reply("502 5.5.1 Error: STARTTLS not available")]
        return [Reply("220 2.0.0 Ready to start TLS"), StartTls()]

    # --- message data -----------------------------------------------------------

    def _take_data(self, events: list[SinkEvent]) -> bool:
        """Move buffered bytes into the message; on the final dot, finish it. True if done."""
        assert self._data is not None
        self._data += self._buffer
        self._buffer.clear()
        end = self._data.find(DATA_END, max(0, self._scanned - len(DATA_END)))
        if end < 0:
            self._scanned = len(self._data)
            if len(self._data) > self.max_message_size:
                self._oversize = True
                del self._data[2 : -len(DATA_END)]  # keep the tail to find the end
                self._scanned = len(self._data)
            return False
        self._buffer += self._data[end + len(DATA_END) :]
        body = bytes(self._data[: end + 2]).replace(b"\r\n..", b"\r\n.")[2:] if self.record else b""
        self._data = None
        events.extend(self._finish_message(body))
        return True

    def _finish_message(self, body: bytes) -> list[SinkEvent]:
        faults = self.faults
        reply = "552 5.3.4 Error: message too big" if self._oversize else faults.dot_reply
        message = MessageIn(self._mail_from or "", tuple(self._rcpts), body, accepted=not reply)
        self._reset()
        if faults.drop_after_dot:
            self.closed = True
            return [message, Close()]
        if not reply:
            self._queued += 1
            reply = f"250 2.0.0 Ok: queued as {self._queued}"
        closing = reply.startswith("421")
        self.closed = closing
        events: list[SinkEvent] = [message, Reply(reply, delay=faults.dot_delay)]
        return events + [Close()] if closing else events

    # --- helpers -------------------------------------------------------------------

    def _reset(self) -> None:
        self._mail_from = None
        self._rcpts = []

    def _closing(self, text: str) -> list[SinkEvent]:
        self.closed = True
        return [Reply(text), Close()]

    def _maybe_closing(self, text: str) -> list[SinkEvent]:
        return self._closing(text) if text.startswith("421") else [Reply(text)]


# --- our asyncio sink: I/O ---------------------------------------------------------


@dataclass(frozen=True)
class ReceivedMessage:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes  # empty unless the sink records messages
    received_at: float  # time.time() at the final dot
    peer: str
    session: int  # 1 for the sink's first connection, 2 for the next...
    tls: bool
    accepted: bool  # the final dot got a 2xx
    helo: str = ""  # the name the client gave in its EHLO (or HELO)


class _SinkProtocol(asyncio.Protocol):
    """Carries out a SinkSession's events in order, delays included."""

    def __init__(self, sink: AsyncioSink) -> None:
        self.sink = sink
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.pending: deque[SinkEvent] = deque()
        self.waiting = False
        self.timer: asyncio.TimerHandle | None = None
        self.number = 0
        self.peer = ""
        self.session = SinkSession(sink.faults, sink.hostname, tls_available=sink.tls is not None,
                                   max_message_size=sink.max_message_size, record=sink.record)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = self.transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else ""
        self.number = self.sink._session_opened()
        self.sink._connections.add(self)
        self._run(self.session.start())

    def data_received(self, data: bytes) -> None:
        self._run(self.session.feed(data))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.pending.clear()
        self.transport = None
        self.sink._connections.discard(self)

    def _run(self, events: list[SinkEvent]) -> None:
        self.pending.extend(events)
        if not self.waiting:
            self._drain()

    def _drain(self) -> None:
        out: list[str] = []
        while self.pending and not self.waiting and self.transport is not None:
            event = self.pending.popleft()
            if isinstance(event, MessageIn):
                self.sink._message_in(event, self)
            elif isinstance(event, Reply) and event.delay <= 0:
                out.append(event.text)
            else:
                self._write(out)
                out = []
                self._pause_for(event)
        self._write(out)

    def _write(self, lines: list[str]) -> None:
        if lines and self.transport is not None:
            self.transport.write("".join(line + "\r\n" for line in lines).encode())

    def _pause_for(self, event: SinkEvent) -> None:
        assert self.transport is not None
        if isinstance(event, Close):
            self.pending.clear()
            self.transport.close()
        elif isinstance(event, Reply):
            self.waiting = True
            self.transport.pause_reading()
            self.timer = self.loop.call_later(event.delay, self._delayed_reply, event.text)
        elif isinstance(event, StartTls):
            self.waiting = True
            self.loop.create_task(self._start_tls())

    def _delayed_reply(self, text: str) -> None:
        self.timer = None
        if self.transport is None:
            return
        self._write([text])
        self.waiting = False
        self.transport.resume_reading()
        self._drain()

    async def _start_tls(self) -> None:
        assert self.transport is not None and self.sink.tls is not None
        try:
            self.transport = await self.loop.start_tls(
                self.transport, self, self.sink.tls, server_side=True
            )
        except (OSError, ssl.SSLError, ConnectionError):
            if self.transport is not None:
                self.transport.abort()
            return
        self.session.tls_started()
        self.waiting = False
        self._drain()


SESSIONS, MESSAGES, ACCEPTED = range(3)


class _CountingSink:
    """What both forms of our sink report: `counts` is [sessions, messages, accepted]."""

    host: str
    port: int
    counts: Sequence[int]

    @property
    def address(self) -> str:
        return hostport(self.host, self.port)

    @property
    def sessions(self) -> int:
        return self.counts[SESSIONS]

    @property
    def messages(self) -> int:
        return self.counts[MESSAGES]

    @property
    def accepted(self) -> int:
        return self.counts[ACCEPTED]


class AsyncioSink(_CountingSink):
    """Our SMTP sink: counts, records and fails on purpose (see SinkFaults).

    Counters: `sessions` (connections accepted), `messages` (final dots received,
    whatever the reply), `accepted` (messages answered 250). `received` holds one
    ReceivedMessage per message (data only when `record` is true).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        faults: SinkFaults | None = None,
        record: bool = True,
        hostname: str = "sink.test",
        tls: ssl.SSLContext | None = None,
        max_message_size: int = 64 * 1024 * 1024,
        keep_received: int = 1_000_000,
    ) -> None:
        self.host = host
        self.port = port
        self.faults = faults or SinkFaults()
        self.record = record
        self.hostname = hostname
        self.tls = tls
        self.max_message_size = max_message_size
        self.received: deque[ReceivedMessage] = deque(maxlen=keep_received)
        self.counts = [0, 0, 0]
        self._server: asyncio.Server | None = None
        self._connections: set[_SinkProtocol] = set()
        self._thread = LoopThread(f"asyncio-sink-{host}")

    def _bump(self, index: int) -> int:
        self.counts[index] += 1
        return self.counts[index]

    def _session_opened(self) -> int:
        return self._bump(SESSIONS)

    def _message_in(self, message: MessageIn, protocol: _SinkProtocol) -> None:
        self._bump(MESSAGES)
        if message.accepted and not self.faults.drop_after_dot:
            self._bump(ACCEPTED)
        if self.received.maxlen == 0:
            return
        self.received.append(ReceivedMessage(
            message.mail_from, message.rcpt_tos, message.data, time.time(), protocol.peer,
            protocol.number, protocol.session.tls_active,
            message.accepted and not self.faults.drop_after_dot, protocol.session.helo,
        ))

    def snapshot(self) -> list[ReceivedMessage]:
        """The messages received so far, copied in one step: iterating `received` while
        the sink's thread appends to it raises "deque mutated during iteration"."""
        return list(self.received)

    def reset(self) -> None:
        """Zero the counters and forget received messages."""
        self.received.clear()
        self.counts[:] = [0] * len(self.counts)

    # --- in a running loop ---------------------------------------------------

    async def start_async(self) -> AsyncioSink:
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _SinkProtocol(self), self.host, self.port, backlog=1024
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop_async(self) -> None:
        if self._server is not None:
            self._server.close()
            for protocol in list(self._connections):
                if protocol.transport is not None:
                    protocol.transport.abort()
            await self._server.wait_closed()
            self._server = None

    async def wait_for_async(self, *, messages: int = 0, sessions: int = 0,
                             timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while self.messages < messages or self.sessions < sessions:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(POLL)
        return True

    # --- on its own thread -----------------------------------------------------

    def start(self) -> AsyncioSink:
        """Serve from a background thread with its own event loop."""
        if not self._thread.running:
            self._thread.start(self.start_async, self.stop_async)
        return self

    def stop(self) -> None:
        self._thread.stop()

    def wait_for(self, *, messages: int = 0, sessions: int = 0, timeout: float = 10.0) -> bool:
        """From another thread: wait until these many messages and sessions are counted."""
        return wait_until(lambda: self.messages >= messages and self.sessions >= sessions,
                          timeout)

    def __enter__(self) -> AsyncioSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- our asyncio sink in its own process -------------------------------------------


def faults_to_json(faults: SinkFaults) -> str:
    return json.dumps(dataclasses.asdict(faults))


def faults_from_json(text: str) -> SinkFaults:
    values = json.loads(text)
    values["rcpt_rules"] = [(pattern, reply) for pattern, reply in values.get("rcpt_rules", [])]
    return SinkFaults(**values)


def counters_line(sink: AsyncioSink) -> str:
    return f"sessions={sink.sessions} messages={sink.messages} accepted={sink.accepted}"


_PROCESS_COUNTERS = re.compile(rb"sessions=(\d+) messages=(\d+) accepted=(\d+)\n")
REPORT_INTERVAL = 0.02


def top_header(data: bytes, name: str) -> bytes:
    """The value of a top-level header of a received message (b"" when absent)."""
    head = b"\n" + data.split(b"\r\n\r\n", 1)[0]
    marker = b"\n" + name.encode().lower() + b":"
    at = head.lower().find(marker)
    if at < 0:
        return b""
    end = head.find(b"\r", at + len(marker))
    return head[at + len(marker): end if end >= 0 else None].strip()


def arrival_lines(sink: AsyncioSink, header: str) -> list[str]:
    """One line per message received since the last call: the value of `header`, the
    recipients, the arrival time, accepted (1/0), DKIM-signed (1/0)."""
    lines = []
    while sink.received:
        m = sink.received.popleft()
        value = top_header(m.data, header).decode("ascii", "replace").replace(" ", "_") or "-"
        signed = int(bool(top_header(m.data, "DKIM-Signature")))
        lines.append(f"arrival {value} {len(m.rcpt_tos)} {m.received_at:.6f} "
                     f"{int(m.accepted)} {signed}")
    return lines


async def serve_and_report(sink: AsyncioSink, stop: asyncio.Event,
                           arrivals_header: str = "") -> None:
    """Serve `sink`; print its port, then its counters on stdout whenever they change
    (with `arrivals_header`: first a line per message received, see `arrival_lines`)."""
    await sink.start_async()
    print(f"port={sink.port}", flush=True)
    last = ""
    while not stop.is_set():
        line = counters_line(sink)
        arrivals = arrival_lines(sink, arrivals_header) if arrivals_header else []
        if line != last or arrivals:
            print("\n".join([*arrivals, line]), flush=True)
            last = line
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), REPORT_INTERVAL)
    await sink.stop_async()


def server_context(cert: str, key: str = "") -> ssl.SSLContext:
    """A STARTTLS server context from PEM files (a sink's certificate)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key or None)
    return context


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m bench.rig.sinks --listen 127.0.0.2:2525 [--faults JSON]`: an AsyncioSink."""
    parser = argparse.ArgumentParser(description="An asyncio SMTP sink for the bench rig")
    parser.add_argument("--listen", default="127.0.0.1:0", help="host:port (port 0: any)")
    parser.add_argument("--faults", default="{}", help="SinkFaults as JSON")
    parser.add_argument("--hostname", default="sink.test")
    parser.add_argument("--tls-cert", default="", help="PEM certificate chain: offer STARTTLS")
    parser.add_argument("--tls-key", default="", help="PEM private key (empty: in --tls-cert)")
    parser.add_argument("--arrivals", default="", metavar="HEADER",
                        help="report each message received (this header's value, recipients, "
                             "time) on stdout")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    sink = AsyncioSink(host.strip("[]"), int(port), faults=faults_from_json(args.faults),
                       hostname=args.hostname, record=bool(args.arrivals),
                       keep_received=1_000_000 if args.arrivals else 0,
                       tls=server_context(args.tls_cert, args.tls_key) if args.tls_cert else None)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.run_until_complete(serve_and_report(sink, stop, args.arrivals))
    loop.close()


class AsyncioSinkProcess(_CountingSink):
    """An AsyncioSink in a child process (`python -m bench.rig.sinks`), for the bench.

    The child reports its counters on stdout; `sessions`, `messages` and `accepted`
    follow them (a few tens of milliseconds behind). Faults are fixed at start. With
    `arrivals_header`, `received` gets a ReceivedMessage per message as the child reports
    it: its data only that header's line (and a DKIM-Signature line when it had one).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 faults: SinkFaults | None = None, hostname: str = "sink.test",
                 python: str = sys.executable, tls_cert: str = "", tls_key: str = "",
                 arrivals_header: str = "") -> None:
        self.arrivals_header = arrivals_header
        self.received: deque[ReceivedMessage] = deque()
        self.host = host
        self.port = port
        self.faults = faults or SinkFaults()
        self.hostname = hostname
        self.tls_cert = tls_cert  # PEM files: the sink offers STARTTLS
        self.tls_key = tls_key
        self.python = python
        self.counts: tuple[int, ...] = (0, 0, 0)
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> AsyncioSinkProcess:
        if self._proc is not None:
            return self
        argv = [self.python, "-m", "bench.rig.sinks", "--listen",
                hostport(self.host, self.port), "--faults", faults_to_json(self.faults),
                "--hostname", self.hostname]
        if self.tls_cert:
            argv += ["--tls-cert", self.tls_cert, "--tls-key", self.tls_key]
        if self.arrivals_header:
            argv += ["--arrivals", self.arrivals_header]
        root = Path(__file__).resolve().parents[2]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)}
        self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                      env=env)
        assert self._proc.stdout is not None
        readable, _, _ = select.select([self._proc.stdout], [], [], START_TIMEOUT)
        ready = self._proc.stdout.readline() if readable else b""  # "port=N"; EOF on failure
        if not ready.startswith(b"port="):
            self.stop()
            raise RuntimeError(f"sink process did not start on {self.address}")
        self.port = int(ready[5:])
        self._reader = threading.Thread(target=self._read_counters, args=(self._proc,),
                                        name=f"asyncio-sink-proc-{self.port}", daemon=True)
        self._reader.start()
        return self

    def _read_counters(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        pending = b""
        while chunk := os.read(proc.stdout.fileno(), 65536):
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                if line.startswith(b"arrival "):
                    self._arrival(line.decode("ascii", "replace"))
                    continue
                match = _PROCESS_COUNTERS.fullmatch(line + b"\n")
                if match:
                    self.counts = tuple(int(x) for x in match.groups())

    def _arrival(self, line: str) -> None:
        _, value, rcpts, at, accepted, signed = line.split(" ")
        data = f"{self.arrivals_header}: {value}\r\n".encode()
        if signed == "1":
            data += b"DKIM-Signature: (signed)\r\n"
        self.received.append(ReceivedMessage("", ("",) * int(rcpts), data + b"\r\n",
                                             float(at), "", 0, bool(self.tls_cert),
                                             accepted == "1"))

    def wait_for(self, *, messages: int = 0, sessions: int = 0, timeout: float = 10.0) -> bool:
        return wait_until(lambda: self.messages >= messages and self.sessions >= sessions,
                          timeout)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._reader is not None:
            self._reader.join(timeout=5)
            self._reader = None
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> AsyncioSinkProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    main()
