"""What every part of a worker process shares: its config, spool, committer and events.

Built once per worker by mta/engine.py and handed to the parts that need it; the parts
never reach into the worker for anything else.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from mta.config import Config
from mta.events import EventLog
from mta.queue.commit import GroupCommitter
from mta.queue.spool import Spool

Closer = Callable[[], Awaitable[None]]
EventListener = Callable[[dict[str, Any]], None]


@dataclass
class WorkerContext:
    cfg: Config
    index: int  # this worker's number, 0 .. workers - 1
    workers: int
    spool: Spool
    committer: GroupCommitter
    events: EventLog
    closers: list[Closer] = field(default_factory=list)  # run in reverse order at stop
    outbox: Any = None  # mta.outbox.wiring.OutboxRecorder when a sink is configured

    def emit(self, event: dict[str, Any]) -> None:
        event.setdefault("worker", self.index)
        self.events.emit(event)

    def listen(self, listener: EventListener) -> None:
        """Every event this worker emits is also handed to `listener`."""
        self.events.listeners.append(listener)

    def on_close(self, closer: Closer) -> None:
        self.closers.append(closer)
