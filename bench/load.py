"""The load generator: SMTP submissions over many concurrent sessions, reusing connections.

A lean asyncio client (not aiosmtplib) so the generator costs as little CPU as
possible on the machine it shares with the engine: MAIL, RCPT and DATA go in
one pipelined write (RFC 2920), the body in a second, per message.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass
class Submission:
    sender: str
    recipients: list[str]
    data: bytes  # CRLF line ends, already dot-stuffed, no final "."


@dataclass
class LoadResult:
    accepted: int = 0
    refused: int = 0
    errors: int = 0
    elapsed: float = 0.0
    accept_latencies: list[float] = field(default_factory=list)  # seconds, DATA to 250
    accepted_ids: list[str] = field(default_factory=list)
    replies: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.accepted / self.elapsed if self.elapsed else 0.0


class SmtpSession:
    """One client connection speaking just enough ESMTP, with pipelining."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int, helo: str = "loadgen.localhost") -> SmtpSession:
        reader, writer = await asyncio.open_connection(host, port)
        session = cls(reader, writer)
        await session.reply()
        writer.write(f"EHLO {helo}\r\n".encode())
        code, _ = await session.reply()
        if code != 250:
            raise ConnectionError(f"EHLO refused: {code}")
        return session

    async def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("connection closed by server")
            lines.append(line[4:].decode("utf-8", "replace").rstrip())
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(lines)

    async def send(self, sub: Submission) -> tuple[int, str]:
        """Submit one message; the reply to the final dot (or the first refusal)."""
        cmds = [f"MAIL FROM:<{sub.sender}>\r\n"] + [f"RCPT TO:<{r}>\r\n" for r in sub.recipients]
        self.writer.write(("".join(cmds) + "DATA\r\n").encode())
        code, text = await self.reply()
        first_refusal: tuple[int, str] | None = None if code == 250 else (code, text)
        accepted_rcpts = 0
        for _ in sub.recipients:
            rcode, rtext = await self.reply()
            if rcode in (250, 251):
                accepted_rcpts += 1
            elif first_refusal is None:
                first_refusal = (rcode, rtext)
        code, text = await self.reply()  # to DATA
        if code != 354:
            return first_refusal or (code, text)
        self.writer.write(sub.data + b".\r\n")
        code, text = await self.reply()
        if accepted_rcpts < len(sub.recipients) and code == 250 and first_refusal:
            return code, text  # partly accepted still counts as accepted
        return code, text

    async def close(self) -> None:
        try:
            self.writer.write(b"QUIT\r\n")
            await asyncio.wait_for(self.reply(), 2)
        except (TimeoutError, OSError, ConnectionError):
            pass
        self.writer.close()


def make_body(size: int, subject: str, sender: str, recipient: str, campaign: str = "",
              extra_headers: Sequence[str] = ()) -> bytes:
    """A plain-text message of about `size` bytes with CRLF lines, dot-stuffed."""
    headers = [
        f"From: <{sender}>", f"To: <{recipient}>", f"Subject: {subject}",
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}",
        f"Message-ID: <{random.getrandbits(64):016x}@loadgen.localhost>",
        "MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8",
    ]
    if campaign:
        headers.append(f"X-Campaign-ID: {campaign}")
    headers.extend(extra_headers)
    head = "\r\n".join(headers).encode() + b"\r\n\r\n"
    line = b"The quick brown fox jumps over the lazy dog 0123456789 abcdefghij.\r\n"
    body_len = max(0, size - len(head))
    body = (line * (body_len // len(line) + 1))[:body_len]
    body = body[: body.rfind(b"\r\n") + 2] if b"\r\n" in body else b""
    return head + body


async def run_load(host: str, port: int, submissions: Callable[[int], Submission], count: int,
                   sessions: int = 20, messages_per_session: int = 1000,
                   rate: float = 0.0, duration: float = 0.0,
                   on_accept: Callable[[str, float], None] | None = None) -> LoadResult:
    """Send `count` submissions (or for `duration` seconds) over `sessions` connections.

    rate > 0 paces submissions to that many per second overall.
    """
    result = LoadResult()
    counter = iter(range(count if count else 10**12))
    start = time.monotonic()
    deadline = start + duration if duration else float("inf")

    def next_index() -> int | None:
        if time.monotonic() >= deadline:
            return None
        return next(counter, None)

    async def worker() -> None:
        session: SmtpSession | None = None
        sent_on_session = 0
        while (i := next_index()) is not None:
            if rate > 0:
                wait = start + i / rate - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            try:
                if session is None or sent_on_session >= messages_per_session:
                    if session is not None:
                        await session.close()
                    session = await SmtpSession.open(host, port)
                    sent_on_session = 0
                t0 = time.monotonic()
                code, text = await session.send(submissions(i))
                sent_on_session += 1
            except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError):
                result.errors += 1
                session = None
                await asyncio.sleep(0.05)
                continue
            key = f"{code}"
            result.replies[key] = result.replies.get(key, 0) + 1
            if code == 250:
                result.accepted += 1
                result.accept_latencies.append(time.monotonic() - t0)
                queued_id = text.rsplit(" ", 1)[-1]
                result.accepted_ids.append(queued_id)
                if on_accept:
                    on_accept(queued_id, time.time())
            else:
                result.refused += 1
                if code == 421:
                    session = None
        if session is not None:
            await session.close()

    await asyncio.gather(*(worker() for _ in range(sessions)))
    result.elapsed = time.monotonic() - start
    return result
