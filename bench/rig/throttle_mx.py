"""A throttling test MX on loopback: at most K connections and R messages/s, 421 beyond.

It behaves like a large provider that limits a sender: a connection over the K-th is
answered ``421 4.7.0 Try again later, rate limited`` at the greeting and closed; a
message over the rate (a token bucket of R/s, holding `burst` tokens, one per message)
gets the same 421 at MAIL (or RCPT, or after DATA: `reject_at`) and the connection is
closed. R can change at run time (`set_rate`, `schedule`), e.g. R, then R/3, then 2R.

In a test (the same event loop)::

    async with ThrottleMx(max_connections=4, rate=50) as mx:
        ... deliver to 127.0.0.1:mx.port ...
        assert mx.stats.accepted == ...

From synchronous code, or while the engine runs in other processes: ``BackgroundThrottleMx``
runs it in a thread. As a separate process (bench)::

    python -m bench.rig.throttle_mx --port 2601 --max-conn 4 --rate 100 \\
        --schedule 60:33,120:200 --stats-interval 1

prints one JSON line when listening, one per interval with that interval's counts, and
the totals when stopped (SIGINT/SIGTERM). The extension command XSTATS returns the totals.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

DEFER_REPLY = b"421 4.7.0 Try again later, rate limited\r\n"
STAGES = ("mail", "rcpt", "data")


class TokenBucket:
    """`rate` tokens a second, holding at most `capacity` (default: one second's worth)."""

    def __init__(self, rate: float, capacity: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.rate = rate
        self.fixed_capacity = capacity
        self.capacity = self._capacity()
        self.tokens = self.capacity
        self.updated = clock()

    def _capacity(self) -> float:
        return self.fixed_capacity if self.fixed_capacity else max(1.0, self.rate)

    def set_rate(self, rate: float) -> None:
        self._refill()
        self.rate = rate
        self.capacity = self._capacity()
        self.tokens = min(self.tokens, self.capacity)

    def take(self) -> bool:
        self._refill()
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now


@dataclass
class MxStats:
    accepted: int = 0  # messages answered 250 after DATA
    deferred: int = 0  # messages answered 421 for the rate
    refused: int = 0  # connections answered 421 for the connection limit
    connections: int = 0  # connections served (not refused)
    concurrent: int = 0
    max_concurrent: int = 0
    rate: float = 0.0  # the allowed rate now


class ThrottleMx:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, max_connections: int = 4,
                 rate: float = 50.0, burst: float | None = None, reject_at: str = "mail",
                 idle_timeout: float = 60.0) -> None:
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"the test MX listens on loopback only, not {host}")
        if reject_at not in STAGES:
            raise ValueError(f"reject_at must be one of {STAGES}")
        self.host, self.port = host, port
        self.max_connections = max_connections
        self.bucket = TokenBucket(rate, burst)
        self.reject_at = reject_at
        self.idle_timeout = idle_timeout
        self.stats = MxStats(rate=rate)
        self.started = time.monotonic()
        self.timeline: dict[int, list[int]] = {}  # second since start -> [accepted, deferred, refused]
        self.rate_changes: list[tuple[float, float]] = [(0.0, rate)]
        self._server: asyncio.Server | None = None
        self._timers: list[asyncio.TimerHandle] = []
        self._writers: set[asyncio.StreamWriter] = set()

    # --- control ----------------------------------------------------------------------

    async def start(self) -> ThrottleMx:
        self._server = await asyncio.start_server(self._serve, self.host, self.port,
                                                  limit=1 << 20)
        self.port = self._server.sockets[0].getsockname()[1]
        self.started = time.monotonic()
        return self

    async def stop(self) -> None:
        for timer in self._timers:
            timer.cancel()
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> ThrottleMx:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def set_rate(self, rate: float) -> None:
        self.bucket.set_rate(rate)
        self.stats.rate = rate
        self.rate_changes.append((time.monotonic() - self.started, rate))

    def schedule(self, changes: list[tuple[float, float]]) -> None:
        """Change the rate at these (seconds from now, rate) points."""
        loop = asyncio.get_running_loop()
        for delay, rate in changes:
            self._timers.append(loop.call_later(delay, self.set_rate, rate))

    def history(self) -> list[dict[str, Any]]:
        """Per-second counts since start, with the rate allowed in that second."""
        rows = []
        for second in range(max(self.timeline, default=-1) + 1):
            accepted, deferred, refused = self.timeline.get(second, [0, 0, 0])
            rate = [r for t, r in self.rate_changes if t <= second + 1e-9][-1]
            rows.append({"t": second, "accepted": accepted, "deferred": deferred,
                         "refused": refused, "rate": rate})
        return rows

    # --- SMTP -------------------------------------------------------------------------

    def _count(self, index: int) -> None:
        second = int(time.monotonic() - self.started)
        self.timeline.setdefault(second, [0, 0, 0])[index] += 1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.stats.concurrent >= self.max_connections:
            self.stats.refused += 1
            self._count(2)
            await _say_and_close(writer, DEFER_REPLY)
            return
        self.stats.connections += 1
        self.stats.concurrent += 1
        self.stats.max_concurrent = max(self.stats.max_concurrent, self.stats.concurrent)
        self._writers.add(writer)
        try:
            writer.write(b"220 throttle-mx ESMTP\r\n")
            await self._session(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError,
                asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            self.stats.concurrent -= 1
            self._writers.discard(writer)
            writer.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        in_transaction = taken = False
        while True:
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), self.idle_timeout)
            if not line:
                return
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                writer.write(b"250-throttle-mx\r\n250-8BITMIME\r\n250 SIZE 52428800\r\n"
                             if verb == b"EHLO" else b"250 throttle-mx\r\n")
                continue
            stage = {b"MAIL": "mail", b"RCPT": "rcpt", b"DATA": "data"}.get(verb)
            if stage in ("rcpt", "data") and not in_transaction:
                writer.write(b"503 5.5.1 MAIL first\r\n")
                continue
            if stage == "data":
                await self._read_data(reader, writer)
            if stage is not None and stage == self.reject_at and not taken:
                if not self.bucket.take():
                    self.stats.deferred += 1
                    self._count(1)
                    await _say_and_close(writer, DEFER_REPLY)
                    return
                taken = True
            if stage == "mail":
                in_transaction = True
                writer.write(b"250 2.1.0 Ok\r\n")
            elif stage == "rcpt":
                writer.write(b"250 2.1.5 Ok\r\n")
            elif stage == "data":
                self.stats.accepted += 1
                self._count(0)
                writer.write(b"250 2.0.0 Ok: queued\r\n")
                in_transaction = taken = False
            elif verb == b"RSET":
                in_transaction = taken = False
                writer.write(b"250 2.0.0 Ok\r\n")
            elif verb == b"NOOP":
                writer.write(b"250 2.0.0 Ok\r\n")
            elif verb == b"QUIT":
                await _say_and_close(writer, b"221 2.0.0 Bye\r\n")
                return
            elif line[:6].upper() == b"XSTATS":
                writer.write(b"250 " + json.dumps(asdict(self.stats)).encode() + b"\r\n")
            else:
                writer.write(b"502 5.5.2 Command not recognized\r\n")

    @staticmethod
    async def _read_data(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        await writer.drain()
        while await reader.readline() not in (b".\r\n", b""):
            pass


async def _say_and_close(writer: asyncio.StreamWriter, reply: bytes) -> None:
    with contextlib.suppress(ConnectionError):
        writer.write(reply)
        await writer.drain()
    writer.close()


class BackgroundThrottleMx:
    """A ThrottleMx in its own thread and event loop, for synchronous callers.

    with BackgroundThrottleMx(max_connections=4, rate=50) as mx: ... mx.port, mx.stats"""

    def __init__(self, **kwargs: Any) -> None:
        self.mx = ThrottleMx(**kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def port(self) -> int:
        return self.mx.port

    @property
    def stats(self) -> MxStats:
        return self.mx.stats

    def start(self) -> BackgroundThrottleMx:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.mx.start(), self._loop).result(10)
        return self

    def set_rate(self, rate: float) -> None:
        self._loop.call_soon_threadsafe(self.mx.set_rate, rate)

    def schedule(self, changes: list[tuple[float, float]]) -> None:
        self._loop.call_soon_threadsafe(self.mx.schedule, changes)

    def history(self) -> list[dict[str, Any]]:
        return self._call(self.mx.history)

    def _call(self, fn: Callable[[], Any]) -> Any:
        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.mx.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> BackgroundThrottleMx:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- command line -------------------------------------------------------------------------


def parse_schedule(text: str) -> list[tuple[float, float]]:
    """'60:33,120:200' -> [(60.0, 33.0), (120.0, 200.0)] (seconds from start: rate)."""
    changes = []
    for part in filter(None, text.split(",")):
        at, _, rate = part.partition(":")
        changes.append((float(at), float(rate)))
    return changes


async def _main(args: argparse.Namespace) -> None:
    mx = ThrottleMx(args.host, args.port, args.max_conn, args.rate, args.burst, args.reject_at)
    await mx.start()
    mx.schedule(parse_schedule(args.schedule))
    _emit({"event": "listening", "host": mx.host, "port": mx.port})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    last = asdict(mx.stats)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), args.stats_interval or None)
        if args.stats_interval and not stop.is_set():
            now = asdict(mx.stats)
            _emit({"event": "interval", "t": round(time.monotonic() - mx.started, 3),
                   **{k: now[k] - last[k] for k in ("accepted", "deferred", "refused")},
                   "concurrent": now["concurrent"], "rate": now["rate"]})
            last = now
    await mx.stop()
    _emit({"event": "stopped", **asdict(mx.stats), "history": mx.history()})


def _emit(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--max-conn", type=int, default=4, help="K: concurrent connections")
    p.add_argument("--rate", type=float, default=50.0, help="R: messages per second")
    p.add_argument("--burst", type=float, default=None, help="bucket size (default: R)")
    p.add_argument("--reject-at", choices=STAGES, default="mail")
    p.add_argument("--schedule", default="", help="rate changes: SECONDS:RATE,...")
    p.add_argument("--stats-interval", type=float, default=0.0)
    asyncio.run(_main(p.parse_args(argv)))


if __name__ == "__main__":
    main()
