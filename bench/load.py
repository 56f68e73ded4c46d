"""The load generator: SMTP submissions over many concurrent sessions, reusing connections.

A lean asyncio client (not aiosmtplib) so the generator costs as little CPU as
possible on the machine it shares with the engine: MAIL, RCPT and DATA go in
one pipelined write (RFC 2920), the body in a second, per message.

With `Logins`, each session authenticates (AUTH PLAIN, after STARTTLS when the server
offers it) as one account and submits only that account's messages, so a load of
several accounts reaches the MTA as several authenticated senders.
"""

from __future__ import annotations

import asyncio
import base64
import heapq
import itertools
import random
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field


@dataclass
class Submission:
    sender: str
    recipients: list[str]
    data: bytes  # CRLF line ends, already dot-stuffed, no final "."


@dataclass(frozen=True)
class Login:
    user: str
    password: str


@dataclass
class Logins:
    """Who submits message i: `account_of(i)`, with `passwords[account]`."""

    account_of: Callable[[int], str]
    passwords: dict[str, str]

    @classmethod
    def single(cls, user: str, password: str) -> Logins:
        return cls(lambda _: user, {user: password})

    def login(self, i: int) -> Login:
        account = self.account_of(i)
        return Login(account, self.passwords[account])


class AuthRefused(RuntimeError):
    """The server refused the load's credentials: the run stops (retrying would only
    trip the server's protection against password guessing)."""


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
        self.login: Login | None = None

    @classmethod
    async def open(cls, host: str, port: int, helo: str = "loadgen.localhost",
                   login: Login | None = None) -> SmtpSession:
        reader, writer = await asyncio.open_connection(host, port)
        session = cls(reader, writer)
        await session.reply()
        extensions = await session.ehlo(helo)
        if login is not None:
            if "STARTTLS" in extensions:
                extensions = await session.starttls(helo)
            await session.authenticate(login)
        return session

    async def ehlo(self, helo: str) -> set[str]:
        self.writer.write(f"EHLO {helo}\r\n".encode())
        code, text = await self.reply()
        if code != 250:
            raise ConnectionError(f"EHLO refused: {code}")
        return {line.split(" ", 1)[0].upper() for line in text.splitlines()[1:]}

    async def starttls(self, helo: str) -> set[str]:
        """Encrypt the session; load targets are test rigs, so the certificate is not
        checked."""
        self.writer.write(b"STARTTLS\r\n")
        code, text = await self.reply()
        if code != 220:
            raise ConnectionError(f"STARTTLS refused: {code} {text}")
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        await self.writer.start_tls(context)
        return await self.ehlo(helo)

    async def authenticate(self, login: Login) -> None:
        token = base64.b64encode(f"\0{login.user}\0{login.password}".encode()).decode()
        self.writer.write(f"AUTH PLAIN {token}\r\n".encode())
        code, text = await self.reply()
        if code != 235:
            raise AuthRefused(f"AUTH PLAIN as {login.user} refused: {code} {text}")
        self.login = login

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


def session_streams(count: int, sessions: int, logins: Logins | None) -> list[Iterator[int]]:
    """The message indices each session sends, in order. Without logins all sessions
    share one stream; with them, a session sends one account's messages (accounts
    shared by several sessions when there are fewer of them, several accounts taken
    in turn by one session when there are more)."""
    total = count if count else 10**12
    if logins is None:
        shared = iter(range(total))
        return [shared] * sessions
    accounts = list(logins.passwords)

    def of(account: str) -> Iterator[int]:
        return (i for i in range(total) if logins.account_of(i) == account)

    if len(accounts) <= sessions:
        streams = [of(a) for a in accounts]
        return [streams[w % len(accounts)] for w in range(sessions)]
    return [heapq.merge(*(of(a) for a in accounts[w::sessions])) for w in range(sessions)]


async def run_load(host: str, port: int, submissions: Callable[[int], Submission], count: int,
                   sessions: int = 20, messages_per_session: int = 1000,
                   rate: float = 0.0, duration: float = 0.0,
                   on_accept: Callable[[str, float], None] | None = None,
                   logins: Logins | None = None) -> LoadResult:
    """Send `count` submissions (0: no limit) or for `duration` seconds over `sessions`
    connections, each authenticated per `logins` when given.

    rate > 0 paces submissions to that many per second overall.
    """
    result = LoadResult()
    start = time.monotonic()
    deadline = start + duration if duration else float("inf")

    async def worker(indices: Iterator[int]) -> None:
        session: SmtpSession | None = None
        sent_on_session = 0
        for i in itertools.takewhile(lambda _: time.monotonic() < deadline, indices):
            if rate > 0:
                wait = start + i / rate - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            login = logins.login(i) if logins is not None else None
            try:
                if session is None or sent_on_session >= messages_per_session \
                        or session.login != login:
                    if session is not None:
                        await session.close()
                    session = await SmtpSession.open(host, port, login=login)
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

    tasks = [asyncio.ensure_future(worker(stream))
             for stream in session_streams(count, sessions, logins)]
    try:
        await asyncio.gather(*tasks)
    except AuthRefused:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    result.elapsed = time.monotonic() - start
    return result
