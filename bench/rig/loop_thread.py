"""An asyncio event loop serving on a thread of its own: the rig's servers (sinks, the
webhook receiver, the tests' HTTPS servers) run on one while a test or the bench drives
them from the main thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable

START_TIMEOUT = 10.0


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class LoopThread:
    """`start(setup, teardown)` runs `setup()` on a new loop on its own thread and serves
    until `stop()`; `teardown()` runs on the loop before it closes. A failing `setup`
    is raised in the caller's thread."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self, setup: Callable[[], Awaitable[object]],
              teardown: Callable[[], Awaitable[object]]) -> None:
        loop = self.loop = new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(setup())
            except BaseException as exc:
                failure.append(exc)
                loop.close()
                started.set()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(teardown())
            loop.close()

        self._thread = threading.Thread(target=serve, name=self.name, daemon=True)
        self._thread.start()
        started.wait(START_TIMEOUT)
        if failure:
            self._thread = self.loop = None
            raise failure[0]

    def stop(self) -> None:
        if self._thread is None or self.loop is None:
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self._thread = self.loop = None
