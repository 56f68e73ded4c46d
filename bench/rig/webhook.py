"""A webhook receiver on loopback for tests and benchmarks (aiohttp on its own thread).

It checks each POST's X-MTA-Signature with the shared secret the way the README tells a
receiver to, records every batch, and answers what it is told: `script` (a list of
statuses for the next requests, then 200), `hang` (never answer), or `down()` / `up()`
(stop and restart listening on the same port).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from bench.rig.loop_thread import LoopThread
from mta.outbox.signing import HEADER, verify


@dataclass
class Received:
    body: bytes
    signature: str
    status: int  # what the receiver answered
    verified: bool
    at: float

    @property
    def events(self) -> list[dict[str, Any]]:
        return json.loads(self.body)


@dataclass
class WebhookReceiver:
    secret: bytes
    host: str = "127.0.0.1"
    port: int = 0
    path: str = "/events"
    script: list[int] = field(default_factory=list)  # statuses to answer next, then 200
    hang: bool = False
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._thread = LoopThread("webhook-receiver")
        self._runner: web.AppRunner | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.path}"

    # --- what arrived --------------------------------------------------------------------

    def accepted(self) -> list[Received]:
        with self._lock:
            return [r for r in self.received if 200 <= r.status < 300]

    def events(self) -> list[dict[str, Any]]:
        """Every event of every accepted batch, in arrival order (duplicates included)."""
        return [e for r in self.accepted() for e in r.events]

    def unique_ids(self) -> set[str]:
        return {e["id"] for e in self.events()}

    def duplicates(self) -> int:
        ids = [e["id"] for e in self.events()]
        return len(ids) - len(set(ids))

    # --- the server ----------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        header = request.headers.get(HEADER, "")
        ok = verify(self.secret, header, body, time.time())
        if self.hang:
            await asyncio.sleep(3600)
        with self._lock:
            status = self.script.pop(0) if self.script else (200 if ok else 401)
            self.received.append(Received(body, header, status, ok, time.time()))
        return web.Response(status=status)

    async def _start(self) -> None:
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_post(self.path, self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        if not self.port:
            self.port = self._runner.addresses[0][1]

    def start(self) -> WebhookReceiver:
        self._thread.start(self._start, self._cleanup)
        return self

    async def _cleanup(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def stop(self) -> None:
        self._thread.stop()

    down = stop

    def up(self) -> WebhookReceiver:
        """Listen again on the same port."""
        return self.start()

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# --- as a process of its own (`python -m bench.rig.webhook`, for the benchmark) ------------

SECRET_ENV = "MTA_BENCH_WEBHOOK_SECRET"


def stats(receiver: WebhookReceiver, with_ids: bool = False) -> dict[str, Any]:
    accepted = receiver.accepted()
    ids = [e["id"] for r in accepted for e in r.events]
    figures: dict[str, Any] = {
        "requests": len(receiver.received), "batches": len(accepted), "events": len(ids),
        "unique": len(set(ids)), "duplicates": len(ids) - len(set(ids)),
        "bad_signatures": sum(1 for r in receiver.received if not r.verified),
        "largest_batch": max((len(r.events) for r in accepted), default=0),
        "last_at": max((r.at for r in accepted), default=0.0)}
    if with_ids:
        figures["ids"] = sorted(set(ids))
    return figures


def serve_forever(host: str, port: int, secret: bytes) -> None:
    """Receive until SIGTERM; GET /stats (?ids=1 adds every id) says what arrived."""
    import signal
    import sys

    receiver = WebhookReceiver(secret, host, port)

    async def get_stats(request: web.Request) -> web.Response:
        return web.json_response(stats(receiver, request.query.get("ids") == "1"))

    async def main() -> None:
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_post(receiver.path, receiver._handle)
        app.router.add_get("/stats", get_stats)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        print(f"listening {runner.addresses[0][1]}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(main())
    sys.exit(0)


if __name__ == "__main__":
    import argparse
    import os

    parser = argparse.ArgumentParser(description="a loopback webhook receiver (bench)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    serve_forever(args.host, args.port, os.environ[SECRET_ENV].encode())
