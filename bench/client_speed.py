"""Outbound SMTP client speed: aiosmtplib against our pipelining client, loopback sink.

    python -m bench.client_speed [--messages 5000] [--sessions 20] [--size 4096]
                                 [--recipients 1] [--rounds 3] [--loop uvloop|asyncio]

Postfix's smtp-sink (a separate C process, PIPELINING offered) listens on
127.0.0.2. Each client sends --messages messages of about --size bytes, with
--recipients recipients each, over --sessions connections opened up front and
reused for every message (the engine's pooled connections), in rounds that
alternate the clients; the median round is kept. Printed per client: messages per
second (wall clock) and CPU milliseconds per message of the event loop's thread
(resource.RUSAGE_THREAD: the sink and the counter-reading thread are not counted).

Clients:
- aiosmtplib: what mta/delivery/connection.py used before, MAIL, RCPT, DATA one at a
  time (four round trips per message; aiosmtplib cannot pipeline).
- ours: mta.delivery.connection with PIPELINING (two round trips per message).
- ours-nopipe: ours against a sink that does not offer PIPELINING (-p).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiosmtplib
import uvloop

from bench.load import make_body
from bench.rig.sinks import SmtpSink
from mta.delivery.connection import ConnectSettings, Target, connect

HOST = "127.0.0.2"
SENDER = "bench@client-speed.test"


@dataclass
class Round:
    client: str
    messages: int
    wall: float
    cpu: float
    failed: int

    @property
    def rate(self) -> float:
        return self.messages / self.wall if self.wall else 0.0

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.cpu / self.messages if self.messages else 0.0


def thread_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_utime + usage.ru_stime


# A sender: open one session, then send(recipients, data) per message, then close.
Send = Callable[[list[str], bytes], Awaitable[bool]]


async def aiosmtplib_session(port: int) -> tuple[Send, Callable[[], Awaitable[None]]]:
    smtp = aiosmtplib.SMTP(hostname=HOST, port=port, timeout=30, local_hostname="bench.test",
                           start_tls=False)
    await smtp.connect()
    await smtp.ehlo()

    async def send(recipients: list[str], data: bytes) -> bool:
        await smtp.mail(SENDER, options=[f"SIZE={len(data)}"])
        for rcpt in recipients:
            await smtp.rcpt(rcpt)
        reply = await smtp.data(data)
        return reply.code == 250

    async def close() -> None:
        await smtp.quit()

    return send, close


async def our_session(port: int) -> tuple[Send, Callable[[], Awaitable[None]]]:
    settings = ConnectSettings(port=port, helo="bench.test", connect_timeout=10,
                               command_timeout=30)
    conn, failures = await connect([Target("sink.test", HOST)], settings)
    if conn is None:
        raise ConnectionError(failures)

    async def send(recipients: list[str], data: bytes) -> bool:
        results = await conn.send(SENDER, recipients, data)
        return all(r.code == 250 for r in results)

    return send, conn.close


OPENERS = {"aiosmtplib": aiosmtplib_session, "ours": our_session, "ours-nopipe": our_session}


async def one_round(client: str, port: int, messages: int, sessions: int, recipients: int,
                    data: bytes) -> Round:
    opened = await asyncio.gather(*(OPENERS[client](port) for _ in range(sessions)))
    counter = iter(range(messages))
    failed = 0

    async def worker(send: Send) -> None:
        nonlocal failed
        for i in counter:
            rcpts = [f"user{i}.{n}@dest{i % 100}.test" for n in range(recipients)]
            if not await send(rcpts, data):
                failed += 1

    cpu0, wall0 = thread_cpu(), time.perf_counter()
    await asyncio.gather(*(worker(send) for send, _ in opened))
    wall, cpu = time.perf_counter() - wall0, thread_cpu() - cpu0
    await asyncio.gather(*(close() for _, close in opened))
    return Round(client, messages, wall, cpu, failed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--recipients", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--clients", default="aiosmtplib,ours,ours-nopipe")
    args = parser.parse_args(argv)
    clients = [c for c in args.clients.split(",") if c]
    data = make_body(args.size, "client speed", SENDER, "user@dest.test")
    factory = uvloop.new_event_loop if args.loop == "uvloop" else asyncio.new_event_loop
    sinks = {"pipe": SmtpSink(HOST, max_connections=1024), "nopipe": SmtpSink(
        HOST, pipelining=False, max_connections=1024)}
    for sink in sinks.values():
        sink.start()
    rounds: dict[str, list[Round]] = {c: [] for c in clients}
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            for _ in range(args.rounds):
                for client in clients:
                    sink = sinks["nopipe" if client == "ours-nopipe" else "pipe"]
                    rounds[client].append(runner.run(one_round(
                        client, sink.port, args.messages, args.sessions, args.recipients,
                        data)))
    finally:
        for sink in sinks.values():
            sink.stop()
    print(f"{args.messages} messages x {len(data)} bytes, {args.recipients} recipient(s),"
          f" {args.sessions} sessions, {args.loop}, smtp-sink on {HOST};"
          f" median of {args.rounds} rounds")
    print(f"{'client':<12} {'msg/s':>8} {'CPU ms/msg':>11} {'failed':>7}")
    for client, done in rounds.items():
        median = sorted(done, key=lambda r: r.cpu_ms)[len(done) // 2]
        rate = statistics.median(r.rate for r in done)
        print(f"{client:<12} {rate:>8.0f} {median.cpu_ms:>11.3f} {median.failed:>7}")


if __name__ == "__main__":
    main()
